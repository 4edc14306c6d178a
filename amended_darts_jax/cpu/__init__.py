"""What exists for XLA:CPU alone, behind one door.

  dispatch.py   decides, per backend and device count, how the depthwise
                convolutions and max pooling run (`conv_pool_impl`), and
                whether rematerialization pays under this jax
  depthwise.py  the depthwise convolution as XLA's grouped convolution and in
                two pure-JAX forms that XLA:CPU runs fast
  kernels.py    the C++ kernels (kernels.cc) for XLA:CPU, built on first use
  hostmem.py    transparent huge pages for XLA:CPU's per-step buffers, by
                re-running a command once (command-line entries only)

Nothing here runs on import; this file imports nothing, so that hostmem can
re-run a command before jax loads.
"""
