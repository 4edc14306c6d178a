// Depthwise convolution and max pooling on CPU as XLA FFI custom calls (NHWC).
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
// Each call may take up to three more operand pairs of the same shapes after
// the first, and then writes the sum of the map over all pairs (Terms below):
//   DepthwiseForward(x1, k1, x2, k2) = DepthwiseForward(x1, k1) + DepthwiseForward(x2, k2)
// so the product rule's tangent, f(a', b) + f(a, b'), is one call.
// B is a batch of independent convolutions (a vmap), 1 when there is none.
// Attributes: stride s, pad p, dilation d; taps outside the input read zero.
// With the attribute shared = 1, E kernels convolve one input (the edges of
// an edge group, supernet.py): k, y and gy carry an edge axis E after B that
// x and dx lack, and the input gradient is summed over the edges:
//   DepthwiseForward(x[B,N,H,W,C], k[B,E,K,K,C])          -> y[B,E,N,Ho,Wo,C]
//   DepthwiseInputGrad(gy[B,E,N,Ho,Wo,C], k[B,E,K,K,C])   -> dx[B,N,H,W,C]
//   DepthwiseKernelGrad(x[B,N,H,W,C], gy[B,E,N,Ho,Wo,C])  -> dk[B,E,K,K,C]
// Work is split over the images (B*E*N; B*N for the summed input gradient)
// on XLA's intra-op thread pool; the calling
// thread takes images too and waits only for images already being worked on,
// so a busy pool cannot deadlock it. Every output element is summed in an
// order fixed by the shapes alone, never by the threads' timing, so the same
// call gives the same bits on any number of threads.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t B, E, N, H, W, C, K, Ho, Wo, s, p, d;
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

// The output columns [lo, hi) whose input column ow * s + shift lies in [0, W).
inline std::pair<int64_t, int64_t> Columns(const Geometry& g, int64_t shift) {
  const int64_t lo = shift >= 0 ? 0 : (-shift + g.s - 1) / g.s;
  const int64_t hi = g.W - 1 - shift < 0 ? 0 : std::min<int64_t>(g.Wo, (g.W - 1 - shift) / g.s + 1);
  return {lo, hi};
}

// Calls run(ih, oh, shift, t, lo, hi) for every output row oh and kernel tap t =
// (i, j) of one image whose input row ih is inside the input: the tap reads
// input column ow * s + shift for output column ow, and the output columns it
// reads inside the input, ow in [lo, hi), are found once per row and tap, so
// the loops over them need no bounds checks.
template <typename Run>
inline void ForEachTapRow(const Geometry& g, Run run) {
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    for (int64_t i = 0; i < g.K; ++i) {
      const int64_t ih = oh * g.s + i * g.d - g.p;
      if (ih < 0 || ih >= g.H) continue;
      for (int64_t j = 0; j < g.K; ++j) {
        const int64_t shift = j * g.d - g.p;
        const auto [lo, hi] = Columns(g, shift);
        run(ih, oh, shift, i * g.K + j, lo, hi);
      }
    }
  }
}

// Calls tap(in, out, k) for every tap of one image that reads inside the input:
// `in` is the offset of input pixel (ih, iw), `out` of output pixel (oh, ow) and
// `k` of kernel tap (i, j), each to be followed by C channels.
template <typename Tap>
inline void ForEachTap(const Geometry& g, Tap tap) {
  ForEachTapRow(g, [&](int64_t ih, int64_t oh, int64_t shift, int64_t t, int64_t lo,
                       int64_t hi) {
    for (int64_t ow = lo; ow < hi; ++ow)
      tap((ih * g.W + ow * g.s + shift) * g.C, (oh * g.Wo + ow) * g.C, t * g.C);
  });
}

// acc[c] += u[c] * v[c] over the channels: every kernel's inner loop. The
// restrict-qualified parameters let the compiler vectorize it without alias checks.
template <int64_t kChannels, typename T>
inline void MultiplyAddFixed(T* __restrict acc, const T* __restrict u, const T* __restrict v) {
  for (int64_t c = 0; c < kChannels; ++c) acc[c] += u[c] * v[c];
}

// Calls f(std::integral_constant<int64_t, channels>{}) and returns true where
// `channels` is one of the supernet's channel counts, C, 2C and 4C for C = 16,
// which get loops of known length (whole vector registers, no remainder);
// returns false for any other count. The branch always goes one way.
template <typename F>
inline bool WithFixedChannels(int64_t channels, F f) {
  switch (channels) {
    case 16: f(std::integral_constant<int64_t, 16>{}); return true;
    case 32: f(std::integral_constant<int64_t, 32>{}); return true;
    case 64: f(std::integral_constant<int64_t, 64>{}); return true;
    default: return false;
  }
}

// Calls f(std::integral_constant<int64_t, terms>{}) for the 1 to kMaxTerms
// operand pairs of a call (Terms below), so that the loops over them have a
// known length (with a runtime count the single-pair calls looked slower in a
// raw-call A/B).
constexpr int64_t kMaxTerms = 4;

template <typename F>
inline void WithTerms(int64_t terms, F f) {
  switch (terms) {
    case 1: f(std::integral_constant<int64_t, 1>{}); return;
    case 2: f(std::integral_constant<int64_t, 2>{}); return;
    case 3: f(std::integral_constant<int64_t, 3>{}); return;
    default: f(std::integral_constant<int64_t, kMaxTerms>{}); return;
  }
}

template <typename T>
inline void MultiplyAdd(T* __restrict acc, const T* __restrict u, const T* __restrict v,
                        int64_t channels) {
  if (WithFixedChannels(channels, [&](auto fixed) { MultiplyAddFixed<fixed()>(acc, u, v); }))
    return;
  for (int64_t c = 0; c < channels; ++c) acc[c] += u[c] * v[c];
}

// One image's correlation with kChannels channels known at compile time, summed
// over `edges` (input, kernel) pairs `edge_in` and `edge_k` apart:
//   out[oh, ow] = sum_e sum_ij in_e[oh * s + i * d - p, ow * s + j * d - p] k_e[tap(i, j)]
// with tap(i, j) = (i, j), or (K-1-i, K-1-j) when kFlip. Each output pixel sums
// its taps in a local accumulator (registers) and is written once, where
// ForEachTap's order loads and stores it once a tap. The forward convolution
// is this with one edge; the input gradient at stride 1 is this on gy with the
// flipped kernel and padding d * (K - 1) - p, summed over the edges.
struct Window {
  int64_t in_h, in_w, out_h, out_w, K, s, p, d;
};

template <int64_t kChannels, bool kFlip, int64_t kTerms, typename T>
void CorrelateImageFixed(const Window& g, int64_t edges, const T* const* in, int64_t edge_in,
                         const T* const* k, int64_t edge_k, T* __restrict out) {
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      T acc[kChannels] = {};
      for (int64_t term = 0; term < kTerms; ++term) {
        for (int64_t e = 0; e < edges; ++e) {
          for (int64_t i = 0; i < g.K; ++i) {
            const int64_t ih = oh * g.s + i * g.d - g.p;
            if (ih < 0 || ih >= g.in_h) continue;
            for (int64_t j = 0; j < g.K; ++j) {
              const int64_t iw = ow * g.s + j * g.d - g.p;
              if (iw < 0 || iw >= g.in_w) continue;
              const int64_t tap = kFlip ? (g.K - 1 - i) * g.K + (g.K - 1 - j) : i * g.K + j;
              const T* __restrict xv = in[term] + e * edge_in + (ih * g.in_w + iw) * kChannels;
              const T* __restrict kv = k[term] + e * edge_k + tap * kChannels;
              for (int64_t c = 0; c < kChannels; ++c) acc[c] += xv[c] * kv[c];
            }
          }
        }
      }
      T* __restrict yv = out + (oh * g.out_w + ow) * kChannels;
      for (int64_t c = 0; c < kChannels; ++c) yv[c] = acc[c];
    }
  }
}

// CorrelateImageFixed for the channel counts that have it; false for others.
template <bool kFlip, typename T>
bool CorrelateImage(int64_t channels, const Window& g, int64_t terms, int64_t edges,
                    const T* const* in, int64_t edge_in, const T* const* k, int64_t edge_k,
                    T* out) {
  return WithFixedChannels(channels, [&](auto fixed) {
    WithTerms(terms, [&](auto count) {
      CorrelateImageFixed<fixed(), kFlip, count()>(g, edges, in, edge_in, k, edge_k, out);
    });
  });
}

// One image's kernel gradient with kChannels channels known at compile time,
// added to dk: for each output row and tap, the products along the row are
// summed in a local accumulator (registers) and added to dk once, where
// ForEachTap's order loads and stores dk[tap] once a pixel.
template <int64_t kChannels, int64_t kTerms, typename T>
void KernelGradImageFixed(const Geometry& g, const T* const* x, const T* const* gy,
                          T* __restrict dk) {
  ForEachTapRow(g, [&](int64_t ih, int64_t oh, int64_t shift, int64_t t, int64_t lo,
                       int64_t hi) {
    T acc[kChannels] = {};
    for (int64_t term = 0; term < kTerms; ++term) {
      for (int64_t ow = lo; ow < hi; ++ow) {
        const T* __restrict xv = x[term] + (ih * g.W + ow * g.s + shift) * kChannels;
        const T* __restrict gv = gy[term] + (oh * g.Wo + ow) * kChannels;
        for (int64_t c = 0; c < kChannels; ++c) acc[c] += xv[c] * gv[c];
      }
    }
    T* __restrict kv = dk + t * kChannels;
    for (int64_t c = 0; c < kChannels; ++c) kv[c] += acc[c];
  });
}

// KernelGradImageFixed for the channel counts that have it; false for others.
template <typename T>
bool KernelGradImage(const Geometry& g, int64_t terms, const T* const* x, const T* const* gy,
                     T* dk) {
  return WithFixedChannels(g.C, [&](auto fixed) {
    WithTerms(terms, [&](auto count) { KernelGradImageFixed<fixed(), count()>(g, x, gy, dk); });
  });
}

// The custom calls take float32 or float64 operands, all of one type.
ffi::Error CheckTypes(const char* kernel, const ffi::AnyBuffer& a, const ffi::AnyBuffer& b,
                      const ffi::AnyBuffer& r) {
  const ffi::DataType type = a.element_type();
  if (b.element_type() != type || r.element_type() != type ||
      (type != ffi::DataType::F32 && type != ffi::DataType::F64))
    return ffi::Error::InvalidArgument(std::string(kernel) +
                                       ": float32 or float64 operands of one type");
  return ffi::Error::Success();
}

// run(a, b, r) on the typed data of operands that passed CheckTypes; returns what run returns.
template <typename Run>
auto ByType(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> r, Run run) {
  if (a.element_type() == ffi::DataType::F32)
    return run(a.typed_data<float>(), b.typed_data<float>(), r->typed_data<float>());
  return run(a.typed_data<double>(), b.typed_data<double>(), r->typed_data<double>());
}

enum class Kind { kForward, kInputGrad, kKernelGrad };

// The kernel gradient sums each kernel's images in runs of at least
// kBlockPixels output pixels, at most kKernelGradBlocks runs (Compute below):
// enough work items for the pool, and each run's own partial sum (one more
// pass over the kernel to zero, fill and add) small beside its work.
constexpr int64_t kKernelGradBlocks = 64;
constexpr int64_t kBlockPixels = 256;

struct Empty {};

// A call's operand pairs (a_t, b_t), t < count, all of one shape per side:
// each kernel writes the sum over them of its bilinear map, sum_t f(a_t, b_t),
// in one pass. Two pairs, (a', b) and (a, b'), are the product rule's tangent
// f(a', b) + f(a, b'): one pass and one output where two calls and their sum
// would make three.
template <typename T>
struct Terms {
  int64_t count = 0;
  const T* a[kMaxTerms] = {};
  const T* b[kMaxTerms] = {};

  // Every pair's operands advanced by da and db elements (one image's), into at_a and at_b.
  void At(int64_t da, int64_t db, const T** at_a, const T** at_b) const {
    for (int64_t t = 0; t < count; ++t) at_a[t] = a[t] + da, at_b[t] = b[t] + db;
  }
};

// The three kernels over B*E*N images. Operands by kind (each term's):
//   kForward:    a = x,  b = k,  r = y
//   kInputGrad:  a = gy, b = k,  r = dx
//   kKernelGrad: a = x,  b = gy, r = dk
// Image i of y, gy is (b, e, n) = (i / (E*N), i / N % E, i % N); it reads x
// image b*N + n and kernel i / N (that is b*E + e). With E = 1 all are i and i / N.
template <Kind kind, typename T>
void Compute(ffi::ThreadPool& pool, const Geometry& g, const Terms<T>& terms, T* r) {
  const int64_t in_image = g.H * g.W * g.C, out_image = g.Ho * g.Wo * g.C;
  const int64_t kernel = g.K * g.K * g.C, C = g.C, EN = g.E * g.N, count = terms.count;
  auto x_image = [&](int64_t i) { return (i / EN * g.N + i % g.N) * in_image; };
  const Window forward{g.H, g.W, g.Ho, g.Wo, g.K, g.s, g.p, g.d};
  const Window transposed{g.Ho, g.Wo, g.H, g.W, g.K, 1, g.d * (g.K - 1) - g.p, g.d};  // stride 1
  if constexpr (kind == Kind::kKernelGrad) {
    // Kernel q sums its N images (q * N + n). They are cut into `blocks`
    // contiguous runs fixed by the shapes alone; each run sums into its own
    // slot, in image order, and the slots are added in run order, so the
    // result does not depend on which thread took which run or when it
    // finished. Slots are a cache line apart, so neighbouring runs share none.
    const int64_t kernels = g.B * g.E;
    const int64_t per_block = std::max<int64_t>(1, (kBlockPixels + g.Ho * g.Wo - 1) /
                                                       std::max<int64_t>(1, g.Ho * g.Wo));
    const int64_t blocks = std::min<int64_t>((g.N + per_block - 1) / per_block, kKernelGradBlocks);
    if (blocks == 0) {  // no images: the gradient is zero
      std::fill(r, r + kernels * kernel, T(0));
      return;
    }
    constexpr int64_t kLine = 64 / sizeof(T);
    const int64_t slot = (kernel + kLine - 1) / kLine * kLine + kLine;
    std::unique_ptr<T[]> partial(new T[kernels * blocks * slot]);
    using Acc = std::vector<T>;  // a worker's sum of the run it is on, copied to its slot at the end
    ParallelImages<Acc>(
        pool, kernels * blocks, [&] { return Acc(kernel); },
        [&](int64_t item, Acc& acc) {
          const int64_t q = item / blocks, block = item % blocks;
          T* dk = acc.data();
          std::fill(dk, dk + kernel, T(0));
          for (int64_t n = block * g.N / blocks; n < (block + 1) * g.N / blocks; ++n) {
            const int64_t image = q * g.N + n;
            const T* x[kMaxTerms];
            const T* gy[kMaxTerms];
            terms.At(x_image(image), image * out_image, x, gy);
            if (KernelGradImage(g, count, x, gy, dk)) continue;
            for (int64_t t = 0; t < count; ++t) {
              ForEachTap(g, [&](int64_t in, int64_t out, int64_t tap) {
                MultiplyAdd(dk + tap, x[t] + in, gy[t] + out, C);
              });
            }
          }
          std::copy(dk, dk + kernel, partial.get() + item * slot);
        },
        [](Acc&) {});
    for (int64_t q = 0; q < kernels; ++q) {  // the runs' sums, in run order
      T* dk = r + q * kernel;
      const T* first = partial.get() + q * blocks * slot;
      std::copy(first, first + kernel, dk);
      for (int64_t block = 1; block < blocks; ++block) {
        const T* part = first + block * slot;
        for (int64_t e = 0; e < kernel; ++e) dk[e] += part[e];
      }
    }
  } else if constexpr (kind == Kind::kForward) {
    ParallelImages<Empty>(
        pool, g.B * EN, [] { return Empty{}; },
        [&](int64_t image, Empty&) {
          const T* x[kMaxTerms];
          const T* k[kMaxTerms];
          terms.At(x_image(image), (image / g.N) * kernel, x, k);
          T* y = r + image * out_image;
          if (CorrelateImage<false>(C, forward, count, 1, x, 0, k, 0, y)) return;
          std::memset(y, 0, sizeof(T) * out_image);
          for (int64_t t = 0; t < count; ++t) {
            ForEachTap(g, [&](int64_t in, int64_t out, int64_t tap) {
              MultiplyAdd(y + out, x[t] + in, k[t] + tap, C);
            });
          }
        },
        [](Empty&) {});
  } else {  // one dx image (b, n) sums the E edges' gy images (b, e, n)
    ParallelImages<Empty>(
        pool, g.B * g.N, [] { return Empty{}; },
        [&](int64_t image, Empty&) {
          const int64_t batch = image / g.N, n = image % g.N;
          T* dx = r + image * in_image;
          const T* gy[kMaxTerms];
          const T* k[kMaxTerms];
          terms.At((batch * EN + n) * out_image, batch * g.E * kernel, gy, k);
          if (g.s == 1 && CorrelateImage<true>(C, transposed, count, g.E, gy, g.N * out_image, k,
                                               kernel, dx))
            return;
          std::memset(dx, 0, sizeof(T) * in_image);
          for (int64_t t = 0; t < count; ++t) {
            for (int64_t e = 0; e < g.E; ++e) {
              ForEachTap(g, [&](int64_t in, int64_t out, int64_t tap) {
                MultiplyAdd(dx + in, gy[t] + e * g.N * out_image + out, k[t] + e * kernel + tap, C);
              });
            }
          }
        },
        [](Empty&) {});
  }
}

// The typed data of a call's operand pairs: (a, b), typed as ta and tb, and
// then `more`, which must hold pairs of a's and b's shapes and element type.
template <typename T>
ffi::ErrorOr<Terms<T>> TypedTerms(const T* ta, const T* tb, const ffi::AnyBuffer& a,
                                  const ffi::AnyBuffer& b, const ffi::RemainingArgs& more) {
  if (more.size() % 2 != 0 || static_cast<int64_t>(more.size()) > 2 * (kMaxTerms - 1))
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "depthwise kernel: 1 to " + std::to_string(kMaxTerms) + " pairs of operands"));
  Terms<T> terms;
  terms.count = 1 + more.size() / 2;
  terms.a[0] = ta, terms.b[0] = tb;
  for (size_t i = 0; i < more.size(); ++i) {
    auto buffer = more.get<ffi::AnyBuffer>(i);
    if (!buffer) return ffi::Unexpected(buffer.error());
    const ffi::AnyBuffer& like = i % 2 == 0 ? a : b;
    auto dims = buffer->dimensions(), want = like.dimensions();
    if (buffer->element_type() != like.element_type() ||
        !std::equal(dims.begin(), dims.end(), want.begin(), want.end()))
      return ffi::Unexpected(ffi::Error::InvalidArgument(
          "depthwise kernel: every pair of operands has the first pair's shapes and type"));
    (i % 2 == 0 ? terms.a : terms.b)[1 + i / 2] = buffer->template typed_data<T>();
  }
  return terms;
}

template <Kind kind>
ffi::Error Impl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::RemainingArgs more,
                ffi::Result<ffi::AnyBuffer> r, int64_t stride, int64_t pad, int64_t dilation,
                int64_t shared) {
  if (auto error = CheckTypes("depthwise kernel", a, b, *r); error.failure()) return error;
  // Which operand is shaped like the input [..., N, H, W, C], like the kernel
  // [..., (E,) K, K, C] and like the output [..., (E,) N, Ho, Wo, C].
  auto image = kind == Kind::kInputGrad ? r->dimensions() : a.dimensions();
  auto kernel = kind == Kind::kKernelGrad ? r->dimensions() : b.dimensions();
  auto out = kind == Kind::kForward ? r->dimensions()
                                    : (kind == Kind::kInputGrad ? a.dimensions() : b.dimensions());
  const int64_t rank = image.size(), edge_axes = shared ? 1 : 0;
  if (rank < 4 || static_cast<int64_t>(kernel.size()) != rank - 1 + edge_axes ||
      static_cast<int64_t>(out.size()) != rank + edge_axes)
    return ffi::Error::InvalidArgument("depthwise kernel: bad operand ranks");
  Geometry g{};
  g.B = 1;
  for (int64_t axis = 0; axis < rank - 4; ++axis) {
    if (image[axis] != kernel[axis] || image[axis] != out[axis])
      return ffi::Error::InvalidArgument("depthwise kernel: batch dims differ");
    g.B *= image[axis];
  }
  const int64_t kc = rank - 4 + edge_axes;  // where the kernel's K, K, C and the output's N start
  g.E = shared ? kernel[rank - 4] : 1;
  g.N = image[rank - 4], g.H = image[rank - 3], g.W = image[rank - 2], g.C = image[rank - 1];
  g.K = kernel[kc], g.Ho = out[kc + 1], g.Wo = out[kc + 2];
  g.s = stride, g.p = pad, g.d = dilation;
  if (kernel[kc + 1] != g.K || kernel[kc + 2] != g.C || out[kc + 3] != g.C || out[kc] != g.N ||
      (shared && out[rank - 4] != g.E))
    return ffi::Error::InvalidArgument("depthwise kernel: operand shapes do not agree");
  return ByType(a, b, r, [&](auto* ta, auto* tb, auto* tr) {
    auto terms = TypedTerms(ta, tb, a, b, more);
    if (!terms) return terms.error();
    Compute<kind>(pool, g, *terms, tr);
    return ffi::Error::Success();
  });
}

// Max pooling, k x k windows, stride s, padding p that never wins (-inf):
//   MaxPoolGather(x[B,N,H,W,C], t[B,N,H,W,C])   -> y[B,N,Ho,Wo,C]
//     y[b,n,oh,ow,c] = t at the first maximum of x's window (row-major order,
//     PyTorch's rule); gather(x, x) is the pooling, gather(x, dx) its tangent.
//   MaxPoolScatter(x[B,N,H,W,C], gy[B,N,Ho,Wo,C]) -> dx[B,N,H,W,C]
//     the transpose of gather in t: each gy goes to its window's first maximum.
// Both are linear in their second operand; the maxima are constant almost
// everywhere, so neither has a derivative in x.
enum class PoolKind { kGather, kScatter };

// Per channel, keeps the first maximum (value and offset) against the input at
// `base`; strictly greater, so an equal later value does not take over.
template <typename T>
inline void KeepFirstMax(T* __restrict value, int32_t* __restrict at, const T* __restrict v,
                         int32_t base, int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    const bool more = v[c] > value[c];
    value[c] = more ? v[c] : value[c];
    at[c] = more ? base + static_cast<int32_t>(c) : at[c];
  }
}

template <PoolKind kind, typename T>
void Pool(ffi::ThreadPool& pool, const Geometry& g, const T* x, const T* b, T* r) {
  const int64_t in_image = g.H * g.W * g.C, out_image = g.Ho * g.Wo * g.C, C = g.C;
  struct Best {  // per channel: the first maximum so far and where it is
    std::vector<T> value;
    std::vector<int32_t> at;  // offsets within one image (checked to fit)
  };
  ParallelImages<Best>(
      pool, g.B * g.N, [&] { return Best{std::vector<T>(C), std::vector<int32_t>(C)}; },
      [&](int64_t image, Best& best) {
        const T* xi = x + image * in_image;
        const T* src = b + image * (kind == PoolKind::kGather ? in_image : out_image);
        T* dst = r + image * (kind == PoolKind::kGather ? out_image : in_image);
        if constexpr (kind == PoolKind::kScatter) std::memset(dst, 0, sizeof(T) * in_image);
        T* __restrict value = best.value.data();
        int32_t* __restrict at = best.at.data();
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          const int64_t h0 = std::max<int64_t>(oh * g.s - g.p, 0);
          const int64_t h1 = std::min<int64_t>(oh * g.s - g.p + g.K, g.H);
          for (int64_t ow = 0; ow < g.Wo; ++ow) {
            const int64_t w0 = std::max<int64_t>(ow * g.s - g.p, 0);
            const int64_t w1 = std::min<int64_t>(ow * g.s - g.p + g.K, g.W);
            const int64_t first = (h0 * g.W + w0) * C;
            for (int64_t c = 0; c < C; ++c) value[c] = xi[first + c], at[c] = first + c;
            for (int64_t ih = h0; ih < h1; ++ih) {
              for (int64_t iw = ih == h0 ? w0 + 1 : w0; iw < w1; ++iw) {
                const int64_t base = (ih * g.W + iw) * C;
                KeepFirstMax(value, at, xi + base, static_cast<int32_t>(base), C);
              }
            }
            const int64_t o = (oh * g.Wo + ow) * C;
            if constexpr (kind == PoolKind::kGather) {
              for (int64_t c = 0; c < C; ++c) dst[o + c] = src[at[c]];
            } else {
              for (int64_t c = 0; c < C; ++c) dst[at[c]] += src[o + c];
            }
          }
        }
      },
      [](Best&) {});
}

template <PoolKind kind>
ffi::Error PoolImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer b,
                    ffi::Result<ffi::AnyBuffer> r, int64_t window, int64_t stride, int64_t pad) {
  if (auto error = CheckTypes("max pool kernel", x, b, *r); error.failure()) return error;
  auto image = x.dimensions();
  auto out = kind == PoolKind::kGather ? r->dimensions() : b.dimensions();
  auto other = kind == PoolKind::kGather ? b.dimensions() : r->dimensions();
  const int64_t rank = image.size();
  if (rank < 4 || static_cast<int64_t>(out.size()) != rank ||
      static_cast<int64_t>(other.size()) != rank)
    return ffi::Error::InvalidArgument("max pool kernel: bad operand ranks");
  Geometry g{};
  g.B = 1, g.E = 1;
  for (int64_t axis = 0; axis < rank; ++axis) {
    if (other[axis] != image[axis] || (axis != rank - 3 && axis != rank - 2 && out[axis] != image[axis]))
      return ffi::Error::InvalidArgument("max pool kernel: operand shapes do not agree");
    if (axis < rank - 4) g.B *= image[axis];
  }
  g.N = image[rank - 4], g.H = image[rank - 3], g.W = image[rank - 2], g.C = image[rank - 1];
  g.K = window, g.Ho = out[rank - 3], g.Wo = out[rank - 2], g.s = stride, g.p = pad, g.d = 1;
  if (g.N > 0 && g.H * g.W * g.C >= (int64_t{1} << 31))
    return ffi::Error::InvalidArgument("max pool kernel: an image of 2^31 elements or more");
  if (pad >= window || (g.Ho - 1) * stride - pad >= g.H || (g.Wo - 1) * stride - pad >= g.W)
    return ffi::Error::InvalidArgument("max pool kernel: a window lies outside the input");
  ByType(x, b, r, [&](auto* tx, auto* tb, auto* tr) { Pool<kind>(pool, g, tx, tb, tr); });
  return ffi::Error::Success();
}

}  // namespace

// Every custom call: XLA's thread pool, two operands (the depthwise calls then
// any further pairs, Terms above), one result, then attributes.
#define TWO_OPERANDS                                                       \
  ffi::Ffi::Bind()                                                         \
      .Ctx<ffi::ThreadPool>()                                              \
      .Arg<ffi::AnyBuffer>()                                               \
      .Arg<ffi::AnyBuffer>()

#define DW_BINDING                                                         \
  TWO_OPERANDS                                                             \
      .RemainingArgs()                                                     \
      .Ret<ffi::AnyBuffer>()                                               \
      .Attr<int64_t>("stride")                                             \
      .Attr<int64_t>("pad")                                                \
      .Attr<int64_t>("dilation")                                           \
      .Attr<int64_t>("shared")

XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseForward, Impl<Kind::kForward>, DW_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseInputGrad, Impl<Kind::kInputGrad>, DW_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseKernelGrad, Impl<Kind::kKernelGrad>, DW_BINDING);

#define POOL_BINDING                                                       \
  TWO_OPERANDS                                                             \
      .Ret<ffi::AnyBuffer>()                                               \
      .Attr<int64_t>("window")                                             \
      .Attr<int64_t>("stride")                                             \
      .Attr<int64_t>("pad")

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPoolGather, PoolImpl<PoolKind::kGather>, POOL_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxPoolScatter, PoolImpl<PoolKind::kScatter>, POOL_BINDING);
