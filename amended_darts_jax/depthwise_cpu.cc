// Depthwise convolution on CPU as XLA FFI custom calls (NHWC).
//
// XLA:CPU has no fast depthwise convolution: its grouped convolution runs
// 10-80x slower than a dense one, and the sum of k*k shifted slices that
// ops.py writes instead makes one pass over the activation per tap, in each of
// the forward pass, the input gradient and the kernel gradient. These three
// kernels make one pass each. All three are bilinear in their two operands, so
// their derivatives are calls to the same kernels (cpu_kernels.py).
//
//   DepthwiseForward(x[B,N,H,W,C], k[B,K,K,C])       -> y[B,N,Ho,Wo,C]
//     y[b,n,oh,ow,c] = sum_ij x[b,n,oh*s+i*d-p,ow*s+j*d-p,c] k[b,i,j,c]
//   DepthwiseInputGrad(gy[B,N,Ho,Wo,C], k[B,K,K,C])  -> dx[B,N,H,W,C]  (transpose in x)
//   DepthwiseKernelGrad(x[B,N,H,W,C], gy[B,N,Ho,Wo,C]) -> dk[B,K,K,C]  (transpose in k)
//
// B is a batch of independent convolutions (a vmap), 1 when there is none.
// Attributes: stride s, pad p, dilation d; taps outside the input read zero.
// Work is split over the B*N images on XLA's intra-op thread pool; the calling
// thread takes images too and waits only for images already being worked on,
// so a busy pool cannot deadlock it.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t B, N, H, W, C, K, Ho, Wo, s, p, d;
};

// Runs body(image, worker_state) for image in [0, count) on the caller and the
// pool. make_state() gives each worker its private state; finish(state) runs
// once per worker that took at least one image, before the caller returns.
template <typename State, typename Make, typename Body, typename Finish>
void ParallelImages(ffi::ThreadPool& pool, int64_t count, Make make_state,
                    Body body, Finish finish) {
  struct Shared {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, count, &make_state, &body, &finish]() {
    int64_t taken = 0;
    std::unique_ptr<State> state;
    for (int64_t i; (i = shared->next.fetch_add(1)) < count;) {
      if (!state) state = std::make_unique<State>(make_state());
      body(i, *state);
      ++taken;
    }
    if (taken == 0) return;
    std::lock_guard<std::mutex> lock(shared->mu);
    finish(*state);
    shared->done += taken;
    shared->cv.notify_all();
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
  // Helpers run `work` only while images are left: once `next` has passed
  // `count` a late helper touches nothing but `shared`, which it co-owns, so
  // it may start after this function has returned. Until then the references
  // it holds are alive because the caller waits for every taken image.
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([shared, count, work]() {
      if (shared->next.load() < count) work();
    });
  }
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done == count; });
}

// Calls tap(in, out, k) for every tap of one image that reads inside the input:
// `in` is the offset of input pixel (ih, iw), `out` of output pixel (oh, ow) and
// `k` of kernel tap (i, j), each to be followed by C channels.
template <typename Tap>
inline void ForEachTap(const Geometry& g, Tap tap) {
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    for (int64_t i = 0; i < g.K; ++i) {
      const int64_t ih = oh * g.s + i * g.d - g.p;
      if (ih < 0 || ih >= g.H) continue;
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        for (int64_t j = 0; j < g.K; ++j) {
          const int64_t iw = ow * g.s + j * g.d - g.p;
          if (iw < 0 || iw >= g.W) continue;
          tap((ih * g.W + iw) * g.C, (oh * g.Wo + ow) * g.C, (i * g.K + j) * g.C);
        }
      }
    }
  }
}

// acc[c] += u[c] * v[c] over the channels: every kernel's inner loop. The
// restrict-qualified parameters let the compiler vectorize it without alias checks.
template <typename T>
inline void MultiplyAdd(T* __restrict acc, const T* __restrict u, const T* __restrict v,
                        int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) acc[c] += u[c] * v[c];
}

enum class Kind { kForward, kInputGrad, kKernelGrad };

struct Empty {};

// The three kernels over one batch of B*N images. Operands by kind:
//   kForward:    a = x,  b = k,  r = y
//   kInputGrad:  a = gy, b = k,  r = dx
//   kKernelGrad: a = x,  b = gy, r = dk
template <Kind kind, typename T>
void Compute(ffi::ThreadPool& pool, const Geometry& g, const T* a, const T* b, T* r) {
  const int64_t in_image = g.H * g.W * g.C, out_image = g.Ho * g.Wo * g.C;
  const int64_t kernel = g.K * g.K * g.C, C = g.C;
  if constexpr (kind == Kind::kKernelGrad) {
    std::fill(r, r + g.B * kernel, T(0));
    using Acc = std::vector<T>;  // one worker's sums for all B kernels
    ParallelImages<Acc>(
        pool, g.B * g.N, [&] { return Acc(g.B * kernel, T(0)); },
        [&](int64_t image, Acc& acc) {
          const T* x = a + image * in_image;
          const T* gy = b + image * out_image;
          T* dk = acc.data() + (image / g.N) * kernel;
          ForEachTap(g, [&](int64_t in, int64_t out, int64_t tap) {
            MultiplyAdd(dk + tap, x + in, gy + out, C);
          });
        },
        [&](Acc& acc) {
          for (int64_t e = 0; e < g.B * kernel; ++e) r[e] += acc[e];
        });
  } else {
    ParallelImages<Empty>(
        pool, g.B * g.N, [] { return Empty{}; },
        [&](int64_t image, Empty&) {
          const T* k = b + (image / g.N) * kernel;
          if constexpr (kind == Kind::kForward) {
            const T* x = a + image * in_image;
            T* y = r + image * out_image;
            std::memset(y, 0, sizeof(T) * out_image);
            ForEachTap(g, [&](int64_t in, int64_t out, int64_t tap) {
              MultiplyAdd(y + out, x + in, k + tap, C);
            });
          } else {
            const T* gy = a + image * out_image;
            T* dx = r + image * in_image;
            std::memset(dx, 0, sizeof(T) * in_image);
            ForEachTap(g, [&](int64_t in, int64_t out, int64_t tap) {
              MultiplyAdd(dx + in, gy + out, k + tap, C);
            });
          }
        },
        [](Empty&) {});
  }
}

template <Kind kind>
ffi::Error Impl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                ffi::Result<ffi::AnyBuffer> r, int64_t stride, int64_t pad, int64_t dilation) {
  const ffi::DataType type = a.element_type();
  if (b.element_type() != type || r->element_type() != type ||
      (type != ffi::DataType::F32 && type != ffi::DataType::F64))
    return ffi::Error::InvalidArgument("depthwise kernel: float32 or float64 operands of one type");
  // Which operand is shaped like the input [..., N, H, W, C], like the kernel
  // [..., K, K, C] and like the output [..., N, Ho, Wo, C].
  auto image = kind == Kind::kInputGrad ? r->dimensions() : a.dimensions();
  auto kernel = kind == Kind::kKernelGrad ? r->dimensions() : b.dimensions();
  auto out = kind == Kind::kForward ? r->dimensions()
                                    : (kind == Kind::kInputGrad ? a.dimensions() : b.dimensions());
  const int64_t rank = image.size();
  if (rank < 4 || static_cast<int64_t>(kernel.size()) != rank - 1 ||
      static_cast<int64_t>(out.size()) != rank)
    return ffi::Error::InvalidArgument("depthwise kernel: bad operand ranks");
  Geometry g{};
  g.B = 1;
  for (int64_t axis = 0; axis < rank - 4; ++axis) {
    if (image[axis] != kernel[axis] || image[axis] != out[axis])
      return ffi::Error::InvalidArgument("depthwise kernel: batch dims differ");
    g.B *= image[axis];
  }
  g.N = image[rank - 4], g.H = image[rank - 3], g.W = image[rank - 2], g.C = image[rank - 1];
  g.K = kernel[rank - 4], g.Ho = out[rank - 3], g.Wo = out[rank - 2];
  g.s = stride, g.p = pad, g.d = dilation;
  if (kernel[rank - 3] != g.K || kernel[rank - 2] != g.C || out[rank - 1] != g.C ||
      out[rank - 4] != g.N)
    return ffi::Error::InvalidArgument("depthwise kernel: operand shapes do not agree");
  if (type == ffi::DataType::F32)
    Compute<kind>(pool, g, a.typed_data<float>(), b.typed_data<float>(), r->typed_data<float>());
  else
    Compute<kind>(pool, g, a.typed_data<double>(), b.typed_data<double>(),
                  r->typed_data<double>());
  return ffi::Error::Success();
}

}  // namespace

#define DW_BINDING                                                         \
  ffi::Ffi::Bind()                                                         \
      .Ctx<ffi::ThreadPool>()                                              \
      .Arg<ffi::AnyBuffer>()                                               \
      .Arg<ffi::AnyBuffer>()                                               \
      .Ret<ffi::AnyBuffer>()                                               \
      .Attr<int64_t>("stride")                                             \
      .Attr<int64_t>("pad")                                                \
      .Attr<int64_t>("dilation")

XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseForward, Impl<Kind::kForward>, DW_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseInputGrad, Impl<Kind::kInputGrad>, DW_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseKernelGrad, Impl<Kind::kKernelGrad>, DW_BINDING);
