// ShiftViT shift and the fused shift + GroupNorm(1, C): CUDA kernels.
//
// One thread per output value, walked in the output's memory order (pixels innermost for channels-last
// memory, rows otherwise) so that writes are coalesced; each thread reads its source through the shift
// mapping of csrc/common/shift_geometry.h. The fused op reads x twice: for the GroupNorm statistics
// (double-precision sums reduced per block, then per sample by a one-block-per-sample finishing kernel:
// deterministic, no atomics), then to write both outputs, so no output is read back.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/group_norm_math.h"
#include "../common/shift_checks.h"
#include "../common/shift_geometry.h"

namespace effvit {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kValuesPerBlock = 4096;

struct Strides4 {
  int64_t b, c, h, w;
  __device__ __forceinline__ int64_t offset(int64_t b_, int64_t c_, int64_t h_, int64_t w_) const {
    return b_ * b + c_ * c + h_ * h + w_ * w;
  }
};

Strides4 strides_of(const at::Tensor& bchw) {
  return {bchw.stride(0), bchw.stride(1), bchw.stride(2), bchw.stride(3)};
}

struct Walk {
  int64_t C, H, W;
  int64_t group;       // C / n_div; 0: no shift
  bool reverse;
  bool channel_inner;  // memory order (h, w, c) instead of (c, h, w)

  // coordinates of the i-th value of a sample, in the walk's order; 32-bit division (a sample has
  // fewer than 2^31 values, sample_grid checks), which costs a fraction of 64-bit division on a GPU
  __device__ __forceinline__ void decode(int64_t i64, int64_t* c, int64_t* h, int64_t* w) const {
    int32_t i = static_cast<int32_t>(i64);
    const int32_t C32 = static_cast<int32_t>(C), H32 = static_cast<int32_t>(H), W32 = static_cast<int32_t>(W);
    if (channel_inner) {
      *c = i % C32;
      i /= C32;
      *w = i % W32;
      *h = i / W32;
    } else {
      *w = i % W32;
      i /= W32;
      *h = i % H32;
      *c = i / H32;
    }
  }
};

Walk make_walk(const at::Tensor& out_bchw, int64_t group, bool reverse) {
  const bool channel_inner = out_bchw.size(1) > 1 && out_bchw.stride(1) < out_bchw.stride(3);
  return {out_bchw.size(1), out_bchw.size(2), out_bchw.size(3), group, reverse, channel_inner};
}

// Sums two doubles over the block; the result is valid in thread 0.
__device__ __forceinline__ void block_sum2(double* a, double* b) {
  __shared__ double shared[2][kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    *a += __shfl_down_sync(0xffffffff, *a, offset);
    *b += __shfl_down_sync(0xffffffff, *b, offset);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[0][warp] = *a, shared[1][warp] = *b;
  __syncthreads();
  if (warp == 0) {
    *a = lane < blockDim.x / 32 ? shared[0][lane] : 0.0;
    *b = lane < blockDim.x / 32 ? shared[1][lane] : 0.0;
    for (int offset = 16; offset > 0; offset /= 2) {
      *a += __shfl_down_sync(0xffffffff, *a, offset);
      *b += __shfl_down_sync(0xffffffff, *b, offset);
    }
  }
  __syncthreads();
}

// out = shift(x); with kStats, instead of writing, per-block sums of the shifted values into
// partial[b][block][2] (os then gives the walk's memory order). grid: (blocks per sample, B)
template <typename scalar_t, bool kStats>
__global__ void shift_kernel(const scalar_t* __restrict__ x, Strides4 xs, scalar_t* __restrict__ out, Strides4 os,
                             Walk walk, int64_t sample_numel, double* __restrict__ partial) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.y;
  const int64_t begin = blockIdx.x * kValuesPerBlock;
  const int64_t end = min(begin + kValuesPerBlock, sample_numel);
  double sum = 0, sum_sq = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    int64_t c, h, w;
    walk.decode(i, &c, &h, &w);
    const ShiftOffset off = shift_offset(c, walk.group, walk.reverse);
    const int64_t sh = h + off.dh, sw = w + off.dw;
    const bool valid = sh >= 0 && sh < walk.H && sw >= 0 && sw < walk.W;
    const scalar_t v = valid ? x[xs.offset(b, c, sh, sw)] : scalar_t(0);
    if (kStats) {
      const double d = static_cast<opmath_t>(v);
      sum += d;
      sum_sq += d * d;
    } else {
      out[os.offset(b, c, h, w)] = v;
    }
  }
  if (kStats) {
    block_sum2(&sum, &sum_sq);
    if (threadIdx.x == 0) {
      double* p = partial + 2 * (b * gridDim.x + blockIdx.x);
      p[0] = sum, p[1] = sum_sq;
    }
  }
}

// Per sample: mean, rstd and the coefficients of y = s * coef[b][0][c] + coef[b][1][c]. grid: B
template <typename opmath_t, typename stats_t>
__global__ void finish_moments_kernel(const double* __restrict__ partial, int64_t blocks_per_sample, double count,
                                      double eps, const double* __restrict__ weight, const double* __restrict__ bias,
                                      int64_t C, stats_t* __restrict__ mean, stats_t* __restrict__ rstd,
                                      opmath_t* __restrict__ coef) {
  const int64_t b = blockIdx.x;
  double sum = 0, sum_sq = 0;
  for (int64_t i = threadIdx.x; i < blocks_per_sample; i += blockDim.x) {
    sum += partial[2 * (b * blocks_per_sample + i)];
    sum_sq += partial[2 * (b * blocks_per_sample + i) + 1];
  }
  block_sum2(&sum, &sum_sq);
  __shared__ SampleMoments m;
  if (threadIdx.x == 0) {
    m = moments_from_sums(sum, sum_sq, count, eps);
    mean[b] = static_cast<stats_t>(m.mean);
    rstd[b] = static_cast<stats_t>(m.rstd);
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const double a = m.rstd * weight[c];
    coef[2 * b * C + c] = static_cast<opmath_t>(a);
    coef[(2 * b + 1) * C + c] = static_cast<opmath_t>(bias[c] - m.mean * a);
  }
}

// s = shift(x) and y = s * coef[b][0][c] + coef[b][1][c] from one read of x; s and y share strides os.
// grid: (blocks per sample, B)
template <typename scalar_t, typename opmath_t>
__global__ void shift_affine_kernel(const scalar_t* __restrict__ x, Strides4 xs, scalar_t* __restrict__ s,
                                    scalar_t* __restrict__ y, Strides4 os, Walk walk, int64_t sample_numel,
                                    const opmath_t* __restrict__ coef) {
  const int64_t b = blockIdx.y;
  const int64_t begin = blockIdx.x * kValuesPerBlock;
  const int64_t end = min(begin + kValuesPerBlock, sample_numel);
  const opmath_t* a = coef + 2 * b * walk.C;
  const opmath_t* shift = a + walk.C;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    int64_t c, h, w;
    walk.decode(i, &c, &h, &w);
    const ShiftOffset off = shift_offset(c, walk.group, walk.reverse);
    const int64_t sh = h + off.dh, sw = w + off.dw;
    const bool valid = sh >= 0 && sh < walk.H && sw >= 0 && sw < walk.W;
    const scalar_t v = valid ? x[xs.offset(b, c, sh, sw)] : scalar_t(0);
    const int64_t o = os.offset(b, c, h, w);
    s[o] = v;
    y[o] = static_cast<scalar_t>(static_cast<opmath_t>(v) * a[c] + shift[c]);
  }
}

// A[b][c] = sum_hw dy * s, G[b][c] = sum_hw dy. grid: B * C
template <typename scalar_t>
__global__ void channel_sums_kernel(const scalar_t* __restrict__ dy, Strides4 ds, const scalar_t* __restrict__ s,
                                    Strides4 ss, int64_t C, int64_t H, int64_t W, double* __restrict__ a_out,
                                    double* __restrict__ g_out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.x / C, c = blockIdx.x % C;
  double a = 0, g = 0;
  for (int64_t i = threadIdx.x; i < H * W; i += blockDim.x) {
    const int64_t h = i / W, w = i % W;
    const double gv = static_cast<opmath_t>(dy[ds.offset(b, c, h, w)]);
    a += gv * static_cast<opmath_t>(s[ss.offset(b, c, h, w)]);
    g += gv;
  }
  block_sum2(&a, &g);
  if (threadIdx.x == 0) a_out[blockIdx.x] = a, g_out[blockIdx.x] = g;
}

// Per sample: p[b][c], q[b], r[b] of dx = p * dy + q + r * s, and centered[b][c] = sum dy * xhat. grid: B
template <typename opmath_t>
__global__ void backward_coeffs_kernel(const double* __restrict__ a_sums, const double* __restrict__ g_sums,
                                       const double* __restrict__ weight, const double* __restrict__ mean,
                                       const double* __restrict__ rstd, int64_t C, double count,
                                       opmath_t* __restrict__ p, opmath_t* __restrict__ qr,
                                       double* __restrict__ centered) {
  const int64_t b = blockIdx.x;
  double s1 = 0, s2 = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const double cen = rstd[b] * (a_sums[b * C + c] - mean[b] * g_sums[b * C + c]);
    centered[b * C + c] = cen;
    p[b * C + c] = static_cast<opmath_t>(rstd[b] * weight[c]);
    s1 += weight[c] * g_sums[b * C + c];
    s2 += weight[c] * cen;
  }
  block_sum2(&s1, &s2);
  if (threadIdx.x == 0) {
    const GroupNormBackwardCoeffs k = group_norm_backward_coeffs(s1, s2, mean[b], rstd[b], count);
    qr[2 * b] = static_cast<opmath_t>(k.q);
    qr[2 * b + 1] = static_cast<opmath_t>(k.r);
  }
}

// dx = reverse_shift(g_s + p * g_y + q + r * s). grid: (blocks per sample, B)
template <typename scalar_t, typename opmath_t>
__global__ void shift_grad_kernel(const scalar_t* __restrict__ gs, Strides4 gss, const scalar_t* __restrict__ gy,
                                  Strides4 gys, const scalar_t* __restrict__ s, Strides4 ss, scalar_t* __restrict__ dx,
                                  Strides4 dxs, Walk walk, int64_t sample_numel, const opmath_t* __restrict__ p,
                                  const opmath_t* __restrict__ qr) {
  const int64_t b = blockIdx.y;
  const int64_t begin = blockIdx.x * kValuesPerBlock;
  const int64_t end = min(begin + kValuesPerBlock, sample_numel);
  const opmath_t q = qr[2 * b], r = qr[2 * b + 1];
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    int64_t c, h, w;
    walk.decode(i, &c, &h, &w);
    const ShiftOffset off = shift_offset(c, walk.group, walk.reverse);
    const int64_t sh = h + off.dh, sw = w + off.dw;
    opmath_t v = 0;
    if (sh >= 0 && sh < walk.H && sw >= 0 && sw < walk.W) {
      v = p[b * walk.C + c] * static_cast<opmath_t>(gy[gys.offset(b, c, sh, sw)]) + q +
          r * static_cast<opmath_t>(s[ss.offset(b, c, sh, sw)]);
      if (gs != nullptr) v += static_cast<opmath_t>(gs[gss.offset(b, c, sh, sw)]);
    }
    dx[dxs.offset(b, c, h, w)] = static_cast<scalar_t>(v);
  }
}

dim3 sample_grid(int64_t B, int64_t sample_numel) {
  TORCH_CHECK_VALUE(sample_numel < (int64_t(1) << 31), "one sample has ", sample_numel,
                    " values; the CUDA kernels index up to 2^31 - 1 per sample");
  const int64_t blocks = (sample_numel + kValuesPerBlock - 1) / kValuesPerBlock;
  TORCH_CHECK_VALUE(B <= 65535, "batch size ", B, " exceeds the CUDA kernels' limit of 65535");
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(B));
}

at::Tensor shift_cuda(const at::Tensor& x, int64_t n_div, bool nhwc, bool reverse) {
  const int64_t group = check_shift_input(x, n_div, nhwc);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xv = as_bchw(x, nhwc), ov = as_bchw(out, nhwc);
  const Walk walk = make_walk(ov, group, reverse);
  const int64_t sample_numel = xv.numel() / xv.size(0);
  const dim3 grid = sample_grid(xv.size(0), sample_numel);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effvit::shift", [&] {
    shift_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(xv.const_data_ptr<scalar_t>(), strides_of(xv),
                                                                 ov.mutable_data_ptr<scalar_t>(), strides_of(ov), walk,
                                                                 sample_numel, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> shift_group_norm_cuda(const at::Tensor& x, int64_t n_div,
                                                                                 const at::Tensor& weight,
                                                                                 const at::Tensor& bias, double eps,
                                                                                 bool nhwc) {
  // named tensors, not structured bindings: lambdas below capture them, which nvcc's front end may reject
  const ShiftGroupNormForward fwd = prepare_shift_group_norm(x, n_div, weight, bias, eps, nhwc);
  const int64_t group = fwd.group;
  const at::Tensor &shifted = fwd.shifted, &normalized = fwd.normalized, &mean = fwd.mean, &rstd = fwd.rstd;
  const at::Tensor xv = as_bchw(x, nhwc);
  const int64_t B = xv.size(0), C = xv.size(1);
  if (B == 0) return {shifted, normalized, mean, rstd};
  const c10::cuda::CUDAGuard guard(x.device());

  const at::Tensor sv = as_bchw(shifted, nhwc), yv = as_bchw(normalized, nhwc);
  const Walk shift_walk = make_walk(sv, group, false);
  const int64_t sample_numel = xv.numel() / B;
  const dim3 grid = sample_grid(B, sample_numel);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor partial = at::empty({B, static_cast<int64_t>(grid.x), 2}, x.options().dtype(at::kDouble));
  const at::Tensor w64 = weight.to(at::kDouble).contiguous(), b64 = bias.to(at::kDouble).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effvit::shift_group_norm", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using stats_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const at::Tensor coef = at::empty({B, 2, C}, x.options().dtype(c10::CppTypeToScalarType<opmath_t>::value));
    // pass 1 reads x for the statistics, pass 2 reads it again and writes both outputs
    shift_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(xv.const_data_ptr<scalar_t>(), strides_of(xv),
                                                                nullptr, strides_of(sv), shift_walk, sample_numel,
                                                                partial.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_moments_kernel<opmath_t, stats_t><<<B, kThreads, 0, stream>>>(
        partial.const_data_ptr<double>(), grid.x, static_cast<double>(sample_numel), eps, w64.const_data_ptr<double>(),
        b64.const_data_ptr<double>(), C, mean.mutable_data_ptr<stats_t>(), rstd.mutable_data_ptr<stats_t>(),
        coef.mutable_data_ptr<opmath_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    shift_affine_kernel<scalar_t, opmath_t><<<grid, kThreads, 0, stream>>>(
        xv.const_data_ptr<scalar_t>(), strides_of(xv), sv.mutable_data_ptr<scalar_t>(), yv.mutable_data_ptr<scalar_t>(),
        strides_of(sv), shift_walk, sample_numel, coef.const_data_ptr<opmath_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {shifted, normalized, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shift_group_norm_backward_cuda(
    const std::optional<at::Tensor>& grad_shifted_opt, const at::Tensor& grad_normalized, const at::Tensor& shifted,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd, int64_t n_div, bool nhwc) {
  const at::Tensor* grad_shifted = nullptr;
  const int64_t group = check_shift_group_norm_backward(grad_shifted_opt, grad_normalized, shifted, weight, mean, rstd,
                                                        n_div, nhwc, &grad_shifted);
  const bool has_gs = grad_shifted != nullptr;
  const at::Tensor sv = as_bchw(shifted, nhwc);
  const int64_t B = sv.size(0), C = sv.size(1), H = sv.size(2), W = sv.size(3);
  at::Tensor grad_x = at::empty_like(shifted);
  if (B == 0 || sv.numel() == 0) {
    grad_x.zero_();
    return {grad_x, at::zeros({C}, weight.options()), at::zeros({C}, weight.options())};
  }
  const c10::cuda::CUDAGuard guard(shifted.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor gyv = as_bchw(grad_normalized, nhwc), dxv = as_bchw(grad_x, nhwc);
  const at::Tensor gsv = has_gs ? as_bchw(*grad_shifted, nhwc) : at::Tensor();
  const auto f64 = shifted.options().dtype(at::kDouble);
  const at::Tensor a_sums = at::empty({B, C}, f64), g_sums = at::empty({B, C}, f64), centered = at::empty({B, C}, f64);
  const at::Tensor w64 = weight.to(at::kDouble).contiguous();
  const at::Tensor mean64 = mean.to(at::kDouble).contiguous(), rstd64 = rstd.to(at::kDouble).contiguous();
  const Walk grad_walk = make_walk(dxv, group, /*reverse=*/true);
  const int64_t sample_numel = sv.numel() / B;
  const dim3 grid = sample_grid(B, sample_numel);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, shifted.scalar_type(), "effvit::shift_group_norm_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto op_opts = shifted.options().dtype(c10::CppTypeToScalarType<opmath_t>::value);
    const at::Tensor p = at::empty({B, C}, op_opts), qr = at::empty({B, 2}, op_opts);
    channel_sums_kernel<scalar_t><<<B * C, kThreads, 0, stream>>>(
        gyv.const_data_ptr<scalar_t>(), strides_of(gyv), sv.const_data_ptr<scalar_t>(), strides_of(sv), C, H, W,
        a_sums.mutable_data_ptr<double>(), g_sums.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    backward_coeffs_kernel<opmath_t><<<B, kThreads, 0, stream>>>(
        a_sums.const_data_ptr<double>(), g_sums.const_data_ptr<double>(), w64.const_data_ptr<double>(),
        mean64.const_data_ptr<double>(), rstd64.const_data_ptr<double>(), C, static_cast<double>(sample_numel),
        p.mutable_data_ptr<opmath_t>(), qr.mutable_data_ptr<opmath_t>(), centered.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    shift_grad_kernel<scalar_t, opmath_t><<<grid, kThreads, 0, stream>>>(
        has_gs ? gsv.const_data_ptr<scalar_t>() : nullptr, has_gs ? strides_of(gsv) : Strides4{0, 0, 0, 0},
        gyv.const_data_ptr<scalar_t>(), strides_of(gyv), sv.const_data_ptr<scalar_t>(), strides_of(sv),
        dxv.mutable_data_ptr<scalar_t>(), strides_of(dxv), grad_walk, sample_numel, p.const_data_ptr<opmath_t>(),
        qr.const_data_ptr<opmath_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor grad_weight = centered.sum(0).to(weight.scalar_type());
  at::Tensor grad_bias = g_sums.sum(0).to(weight.scalar_type());
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(effvit, CUDA, m) {
  m.impl("shift", &shift_cuda);
  m.impl("shift_group_norm", &shift_group_norm_cuda);
  m.impl("shift_group_norm_backward", &shift_group_norm_backward_cuda);
}

}  // namespace cuda
}  // namespace effvit
