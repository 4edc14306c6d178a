r"""Default search: the embedded 8x8 digits, s2 space (5 cells), amended gradient (exact products).

Runs offline on a 2-core CPU in two to three minutes, about half of it
compiling (README), and ends with a genotype, its picture and the collapse
plots:

  python -m amended_darts_jax.search --workdir=runs/digits

The architecture learning rate is 3e-3, ten times DARTS' 3e-4: Adam moves a
logit by about its learning rate a step at most, so at 3e-4 the 275 steps of
this search could not take a weight of the two operations further than about
0.04 from 1/2, and the genotype would be close to a coin flip (README,
"Collapse"). The space is
`s2` (skip_connect or sep_conv_3x3 on each of 8 fixed edges, one alpha per
cell) because the `darts` space needs 3 cells to have both cell types and its
amended step then compiles for many minutes on 2 cores (BUILD_NOTES.md,
"Compile time"); `--config.space=darts --config.layers=3` runs it anyway.

Every field can be overridden, e.g. `--config.method=first_order --config.epochs=5`.
The other configs start from this one and change only what differs.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  # What to search.
  c.space = "s2"  # darts | s1 | s2 | s2_all | rdarts_s1 ... rdarts_s4 | nb201 (spaces.py)
  c.dataset = "digits"  # digits | mnist5k (embedded) | cifar10 | cifar100
  c.data_dir = ""  # tfds data_dir; "" is tfds' default
  c.download = False  # let tfds try to download and prepare (needs TensorFlow)
  c.train_portion = 0.5  # search-train share of the training split; the rest validates
  c.init_channels = 8
  c.layers = 5
  c.activation = "relu"  # relu | softplus | gelu | tanh (smooth: exact-vs-fd studies)
  # How depthwise convolutions and max pooling run: auto | conv (XLA) | kernel (C++, CPU)
  # | shift | dense (pure JAX, CPU); amended_darts_jax/cpu/dispatch.py
  c.conv_pool_impl = "auto"
  c.remat = False  # rematerialize per cell (less memory, more time)
  c.edge_groups = True  # the edges leaving a state as one vmapped op (faster; False: per edge)
  # Runs of identical cells as one scan, compile time flat in depth: auto (on GPU/TPU,
  # not on CPU, where the step is slower) | on | off (networks.scans)
  c.scan_cells = "auto"

  # The architecture gradient.
  c.method = "amended"  # first_order | darts | amended | implicit
  c.products = "exact"  # exact | fd
  c.eta = 0.1  # amending coefficient (paper eq. 6)
  c.fd_r = 0.01  # finite-difference step r (DARTS: e = r / |v|)
  c.hessian_weight_decay = True  # H includes the weights' decay: H + wd I (docs/math.md §6)
  c.damping = 0.0  # implicit: CG on H + (wd + damping) I
  c.cg_maxiter = 20
  c.cg_tol = 1e-4

  # Optimization (DARTS' search settings).
  c.epochs = 25
  c.batch_size = 64
  c.lr = 0.025
  c.lr_min = 0.001
  c.momentum = 0.9
  c.nesterov = False  # Nesterov momentum in the weight step (NAS-Bench-201's searches use it)
  c.weight_decay = 3e-4
  c.grad_clip = 5.0  # global norm; 0: no clipping
  c.arch_lr = 3e-3  # DARTS: 3e-4 (configs/cifar10_darts.py); see the docstring
  c.arch_beta1 = 0.5
  c.arch_beta2 = 0.999
  c.arch_weight_decay = 1e-3
  c.seed = 0

  # Augmentation of search batches (digits: small shifts, no flips).
  c.crop_padding = 1
  c.flip = False
  c.cutout = 0

  # Retraining's regularizers in the search (off; configs/s1_consistent.py turns them on).
  c.drop_path_prob = 0.0  # on the non-identity ops of every edge, ramped as DARTS: p * epoch / epochs
  c.dropout = 0.0  # before the classifier
  c.auxiliary = False  # DARTS' auxiliary head after the second reduction cell
  c.auxiliary_weight = 0.4  # its loss weight, in every training-mode loss of the search

  # Running.
  c.max_steps = 0  # stop after this many steps in all; 0: run all epochs
  c.log_every = 10  # steps between logged means (each checkpoint and epoch end also ends one)
  c.checkpoint_every = 100  # steps
  c.eval_every_epochs = 1  # full validation pass in eval mode; 0: never
  c.monitor_every = 0  # steps between gradient-quality diagnostics; 0: off
  c.monitor_solver = "minres"  # the reference g2's solve: minres (indefinite systems too) | cg
  c.monitor_solve_iters = 50
  c.monitor_tol = 1e-6  # relative residual at which the reference solve stops
  c.monitor_damping = 0.0  # the reference solves H + (wd + monitor_damping) I
  c.monitor_power_iters = 20
  c.distributed = False  # call jax.distributed.initialize (pods, multi-process)
  c.coordinator_address = ""  # only where JAX cannot detect the cluster
  c.num_processes = 0
  c.process_id = -1
  c.compilation_cache_dir = "~/.cache/amended_darts_jax/xla"  # "" turns the cache off
  # nb201 only: the NAS-Bench-201 file whose record of the searched cell is written to
  # nb201_lookup.json (its pip API needed, nb201.py); "": no look-up.
  c.nb201_benchmark = ""
  return c
