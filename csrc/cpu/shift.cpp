// ShiftViT shift and the fused shift + GroupNorm(1, C): CPU kernels.
//
// Every kernel walks its output as "lines" along the innermost memory dimension: one row of one
// channel (W values, NCHW memory) or one pixel (C values, channels-last memory). Shifting a line
// splits it into at most five segments, each either copied from one neighbouring line or zero, so the
// inner loops are plain strided copies (memcpy when both sides are contiguous) whatever the layout and
// strides of the tensors.
//
// Work is cut into tasks of whole lines of one sample. When there are at least as many samples as
// threads, one task is a whole sample, so the GroupNorm passes re-read a sample while it is still in
// cache; otherwise a sample is split into chunks of ~kTaskElements values that all threads share.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <cstring>
#include <vector>

#include "../common/group_norm_math.h"
#include "../common/shift_checks.h"
#include "../common/shift_geometry.h"
#include "cpu_isa.h"

namespace effvit {
namespace cpu {
namespace {

constexpr int64_t kTaskElements = 1 << 15;

// Strides of a logical [B, C, H, W] tensor.
struct Strides4 {
  int64_t b, c, h, w;
  int64_t offset(int64_t b_, int64_t c_, int64_t h_, int64_t w_) const { return b_ * b + c_ * c + h_ * h + w_ * w; }
};

Strides4 strides_of(const at::Tensor& bchw) {
  return {bchw.stride(0), bchw.stride(1), bchw.stride(2), bchw.stride(3)};
}

// How a [B, C, H, W] tensor is walked, and the shift applied while walking (group == 0: no shift).
struct LineWalk {
  int64_t B, C, H, W;
  int64_t group;
  bool reverse;
  bool channel_inner;  // lines are pixels (C values) instead of rows (W values)

  int64_t lines_per_sample() const { return channel_inner ? H * W : C * H; }
  int64_t length() const { return channel_inner ? C : W; }
  int64_t inner_stride(const Strides4& s) const { return channel_inner ? s.c : s.w; }
};

struct Segment {
  int64_t start, len;  // position along the line
  bool valid;          // false: the segment is zero fill
  int64_t c, h, w;     // source coordinates of the segment's first value
};

struct Line {
  int64_t c, h, w;  // coordinates of the line's first value
  int n;
  Segment seg[5];
};

EFFVIT_ALWAYS_INLINE void make_line(const LineWalk& lw, int64_t l, Line* line) {
  line->n = 0;
  if (lw.channel_inner) {
    const int64_t h = l / lw.W, w = l % lw.W;
    line->c = 0, line->h = h, line->w = w;
    for (int64_t k = 0; k < 5; ++k) {
      int64_t c0, c1;
      shift_group_range(k, lw.group, lw.C, &c0, &c1);
      if (c1 <= c0) continue;
      const ShiftOffset off = shift_offset(c0, lw.group, lw.reverse);
      const int64_t sh = h + off.dh, sw = w + off.dw;
      const bool valid = sh >= 0 && sh < lw.H && sw >= 0 && sw < lw.W;
      line->seg[line->n++] = {c0, c1 - c0, valid, c0, sh, sw};
    }
    return;
  }
  const int64_t c = l / lw.H, h = l % lw.H;
  line->c = c, line->h = h, line->w = 0;
  const ShiftOffset off = shift_offset(c, lw.group, lw.reverse);
  const int64_t sh = h + off.dh;
  if (sh < 0 || sh >= lw.H) {
    line->seg[line->n++] = {0, lw.W, false, c, 0, 0};
    return;
  }
  const int64_t lo = std::max<int64_t>(0, -off.dw), hi = std::min<int64_t>(lw.W, lw.W - off.dw);
  if (lo > 0) line->seg[line->n++] = {0, lo, false, c, 0, 0};
  if (hi > lo) line->seg[line->n++] = {lo, hi - lo, true, c, sh, lo + off.dw};
  if (hi < lw.W) line->seg[line->n++] = {hi, lw.W - hi, false, c, 0, 0};
}

template <typename T>
EFFVIT_ALWAYS_INLINE void fill_zero(T* dst, int64_t stride, int64_t n) {
  if (stride == 1) {
    std::memset(static_cast<void*>(dst), 0, n * sizeof(T));
    return;
  }
  for (int64_t j = 0; j < n; ++j) dst[j * stride] = T(0);
}

// ---- shift: out = shift(x), optionally summing the shifted values (for GroupNorm) ----------------

// `Stats` is std::true_type to also sum the shifted values into sums[0] (x) and sums[1] (x^2).
template <typename Stats, typename scalar_t>
EFFVIT_ALWAYS_INLINE void shift_lines_body(Stats, const scalar_t* x, Strides4 xs, scalar_t* out, Strides4 os, LineWalk lw,
                                           int64_t b, int64_t l_begin, int64_t l_end, double* sums) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr bool kStats = Stats::value;
  const int64_t xi = lw.inner_stride(xs), oi = lw.inner_stride(os);
  double sum = 0, sum_sq = 0;
  Line line;
  for (int64_t l = l_begin; l < l_end; ++l) {
    make_line(lw, l, &line);
    scalar_t* o = out + os.offset(b, line.c, line.h, line.w);
    for (int i = 0; i < line.n; ++i) {
      const Segment& s = line.seg[i];
      scalar_t* dst = o + s.start * oi;
      if (!s.valid) {
        fill_zero(dst, oi, s.len);
        continue;
      }
      const scalar_t* src = x + xs.offset(b, s.c, s.h, s.w);
      if (xi == 1 && oi == 1) {
        std::memcpy(static_cast<void*>(dst), static_cast<const void*>(src), s.len * sizeof(scalar_t));
        if (kStats) {
#pragma omp simd reduction(+ : sum, sum_sq)
          for (int64_t j = 0; j < s.len; ++j) {
            const double v = static_cast<opmath_t>(src[j]);
            sum += v;
            sum_sq += v * v;
          }
        }
      } else {
        for (int64_t j = 0; j < s.len; ++j) {
          const scalar_t v = src[j * xi];
          dst[j * oi] = v;
          if (kStats) {
            const double d = static_cast<opmath_t>(v);
            sum += d;
            sum_sq += d * d;
          }
        }
      }
    }
  }
  if (kStats) sums[0] += sum, sums[1] += sum_sq;
}
EFFVIT_CPU_ISA_VARIANTS(shift_lines, shift_lines_body)

// ---- per-channel affine: y = s * a[c] + shift[c] (the GroupNorm output) ---------------------------

template <typename scalar_t, typename opmath_t>
EFFVIT_ALWAYS_INLINE void affine_lines_body(const scalar_t* s, Strides4 ss, scalar_t* y, Strides4 ys, LineWalk lw,
                                            int64_t b, int64_t l_begin, int64_t l_end, const opmath_t* a,
                                            const opmath_t* shift) {
  const int64_t si = lw.inner_stride(ss), yi = lw.inner_stride(ys), n = lw.length();
  const bool contiguous = si == 1 && yi == 1;
  for (int64_t l = l_begin; l < l_end; ++l) {
    const int64_t c = lw.channel_inner ? 0 : l / lw.H;
    const int64_t h = lw.channel_inner ? l / lw.W : l % lw.H;
    const int64_t w = lw.channel_inner ? l % lw.W : 0;
    const scalar_t* src = s + ss.offset(b, c, h, w);
    scalar_t* dst = y + ys.offset(b, c, h, w);
    if (lw.channel_inner && contiguous) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(static_cast<opmath_t>(src[j]) * a[j] + shift[j]);
    } else if (lw.channel_inner) {
      for (int64_t j = 0; j < n; ++j)
        dst[j * yi] = static_cast<scalar_t>(static_cast<opmath_t>(src[j * si]) * a[j] + shift[j]);
    } else if (contiguous) {
      const opmath_t ac = a[c], sc = shift[c];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(static_cast<opmath_t>(src[j]) * ac + sc);
    } else {
      const opmath_t ac = a[c], sc = shift[c];
      for (int64_t j = 0; j < n; ++j) dst[j * yi] = static_cast<scalar_t>(static_cast<opmath_t>(src[j * si]) * ac + sc);
    }
  }
}
EFFVIT_CPU_ISA_VARIANTS(affine_lines, affine_lines_body)

// ---- backward pass 1: per-channel sums A[c] = sum dy * s and G[c] = sum dy -------------------------

template <typename scalar_t>
EFFVIT_ALWAYS_INLINE void channel_sums_body(const scalar_t* dy, Strides4 ds, const scalar_t* s, Strides4 ss,
                                            LineWalk lw, int64_t b, int64_t l_begin, int64_t l_end,
                                            double* acc /* [C][2]: A, G */) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t di = lw.inner_stride(ds), si = lw.inner_stride(ss), n = lw.length();
  for (int64_t l = l_begin; l < l_end; ++l) {
    const int64_t c = lw.channel_inner ? 0 : l / lw.H;
    const int64_t h = lw.channel_inner ? l / lw.W : l % lw.H;
    const int64_t w = lw.channel_inner ? l % lw.W : 0;
    const scalar_t* g = dy + ds.offset(b, c, h, w);
    const scalar_t* v = s + ss.offset(b, c, h, w);
    if (lw.channel_inner) {
      for (int64_t j = 0; j < n; ++j) {
        const double gj = static_cast<opmath_t>(g[j * di]);
        acc[2 * j] += gj * static_cast<opmath_t>(v[j * si]);
        acc[2 * j + 1] += gj;
      }
    } else {
      double a_sum = 0, g_sum = 0;
      if (di == 1 && si == 1) {
#pragma omp simd reduction(+ : a_sum, g_sum)
        for (int64_t j = 0; j < n; ++j) {
          const double gj = static_cast<opmath_t>(g[j]);
          a_sum += gj * static_cast<opmath_t>(v[j]);
          g_sum += gj;
        }
      } else {
        for (int64_t j = 0; j < n; ++j) {
          const double gj = static_cast<opmath_t>(g[j * di]);
          a_sum += gj * static_cast<opmath_t>(v[j * si]);
          g_sum += gj;
        }
      }
      acc[2 * c] += a_sum;
      acc[2 * c + 1] += g_sum;
    }
  }
}
EFFVIT_CPU_ISA_VARIANTS(channel_sums, channel_sums_body)

// ---- backward pass 2: dx = reverse_shift(g_s + p[c] * g_y + q + r * s) ----------------------------

template <typename scalar_t, typename opmath_t>
EFFVIT_ALWAYS_INLINE void shift_grad_lines_body(const scalar_t* gs, Strides4 gss, const scalar_t* gy, Strides4 gys,
                                                const scalar_t* s, Strides4 ss, scalar_t* dx, Strides4 dxs,
                                                LineWalk lw, int64_t b, int64_t l_begin, int64_t l_end,
                                                const opmath_t* p, opmath_t q, opmath_t r) {
  const int64_t gsi = gs ? lw.inner_stride(gss) : 0, gyi = lw.inner_stride(gys), si = lw.inner_stride(ss),
                oi = lw.inner_stride(dxs);
  Line line;
  for (int64_t l = l_begin; l < l_end; ++l) {
    make_line(lw, l, &line);
    scalar_t* o = dx + dxs.offset(b, line.c, line.h, line.w);
    for (int i = 0; i < line.n; ++i) {
      const Segment& sg = line.seg[i];
      scalar_t* dst = o + sg.start * oi;
      if (!sg.valid) {
        fill_zero(dst, oi, sg.len);
        continue;
      }
      const scalar_t* g_y = gy + gys.offset(b, sg.c, sg.h, sg.w);
      const scalar_t* v = s + ss.offset(b, sg.c, sg.h, sg.w);
      const scalar_t* g_s = gs ? gs + gss.offset(b, sg.c, sg.h, sg.w) : nullptr;
      const opmath_t* pc = p + sg.c;
      const int64_t pstep = lw.channel_inner ? 1 : 0;
      if (!lw.channel_inner && gyi == 1 && si == 1 && oi == 1 && (!g_s || gsi == 1)) {
        const opmath_t pv = pc[0];
        if (g_s) {
#pragma omp simd
          for (int64_t j = 0; j < sg.len; ++j)
            dst[j] = static_cast<scalar_t>(static_cast<opmath_t>(g_s[j]) + pv * static_cast<opmath_t>(g_y[j]) + q +
                                           r * static_cast<opmath_t>(v[j]));
        } else {
#pragma omp simd
          for (int64_t j = 0; j < sg.len; ++j)
            dst[j] = static_cast<scalar_t>(pv * static_cast<opmath_t>(g_y[j]) + q + r * static_cast<opmath_t>(v[j]));
        }
        continue;
      }
      for (int64_t j = 0; j < sg.len; ++j) {
        opmath_t t = pc[j * pstep] * static_cast<opmath_t>(g_y[j * gyi]) + q + r * static_cast<opmath_t>(v[j * si]);
        if (g_s) t += static_cast<opmath_t>(g_s[j * gsi]);
        dst[j * oi] = static_cast<scalar_t>(t);
      }
    }
  }
}
EFFVIT_CPU_ISA_VARIANTS(shift_grad_lines, shift_grad_lines_body)

// ---- task partition ------------------------------------------------------------------------------

struct Tasks {
  int64_t per_sample;  // tasks per sample
  int64_t lines;       // lines per task (the last task of a sample may have fewer)
};

Tasks make_tasks(const LineWalk& lw) {
  const int64_t lps = lw.lines_per_sample();
  if (lw.B >= at::get_num_threads() || lps == 0) return {1, std::max<int64_t>(lps, 1)};
  const int64_t lines = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(lw.length(), 1));
  return {(lps + lines - 1) / lines, lines};
}

// Runs fn(task, b, l_begin, l_end) over every task in parallel.
template <typename F>
void for_each_task(const LineWalk& lw, const Tasks& t, const F& fn) {
  const int64_t lps = lw.lines_per_sample();
  at::parallel_for(0, lw.B * t.per_sample, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / t.per_sample, l0 = (task % t.per_sample) * t.lines;
      fn(task, b, l0, std::min(l0 + t.lines, lps));
    }
  });
}

// Memory of the output decides the walk: pixels as lines when channels are innermost in memory.
LineWalk make_walk(const at::Tensor& out_bchw, int64_t group, bool reverse) {
  const bool channel_inner = out_bchw.size(1) > 1 && out_bchw.stride(1) < out_bchw.stride(3);
  return {out_bchw.size(0), out_bchw.size(1), out_bchw.size(2), out_bchw.size(3), group, reverse, channel_inner};
}

// ---- ops -----------------------------------------------------------------------------------------

at::Tensor shift_cpu(const at::Tensor& x, int64_t n_div, bool channels_last, bool reverse) {
  const int64_t group = check_shift_input(x, n_div, channels_last);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const at::Tensor xv = as_bchw(x, channels_last), ov = as_bchw(out, channels_last);
  const LineWalk lw = make_walk(ov, group, reverse);
  const Tasks tasks = make_tasks(lw);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effvit::shift", [&] {
    const scalar_t* xp = xv.const_data_ptr<scalar_t>();
    scalar_t* op = ov.mutable_data_ptr<scalar_t>();
    const Strides4 xs = strides_of(xv), os = strides_of(ov);
    for_each_task(lw, tasks, [&](int64_t, int64_t b, int64_t l0, int64_t l1) {
      shift_lines(std::false_type{}, xp, xs, op, os, lw, b, l0, l1, static_cast<double*>(nullptr));
    });
  });
  return out;
}

void check_channel_vector(const at::Tensor& t, const at::Tensor& x, int64_t channels, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == channels, name, " must have shape [C] = [", channels,
                    "], got ", t.sizes());
  check_float_tensor(t, name);
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> shift_group_norm_cpu(const at::Tensor& x, int64_t n_div,
                                                                                const at::Tensor& weight,
                                                                                const at::Tensor& bias, double eps,
                                                                                bool channels_last) {
  const int64_t group = check_shift_input(x, n_div, channels_last);
  const at::Tensor xv = as_bchw(x, channels_last);
  const int64_t B = xv.size(0), C = xv.size(1);
  check_channel_vector(weight, x, C, "weight");
  check_channel_vector(bias, x, C, "bias");
  TORCH_CHECK_VALUE(eps >= 0, "eps must be >= 0, got ", eps);
  at::Tensor shifted = at::empty_like(x), normalized = at::empty_like(x);
  const auto stats_opts = x.options().dtype(stats_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({B}, stats_opts), rstd = at::empty({B}, stats_opts);
  if (B == 0) return {shifted, normalized, mean, rstd};
  TORCH_CHECK_VALUE(xv.numel() > 0, "shift_group_norm needs C, H and W > 0, got shape ", x.sizes());

  const at::Tensor sv = as_bchw(shifted, channels_last), yv = as_bchw(normalized, channels_last);
  const LineWalk shift_walk = make_walk(sv, group, false);
  LineWalk plain_walk = shift_walk;
  plain_walk.group = 0;
  const Tasks tasks = make_tasks(shift_walk);
  const double count = static_cast<double>(xv.numel() / B);
  const at::Tensor w64 = weight.to(at::kDouble).contiguous(), b64 = bias.to(at::kDouble).contiguous();
  const double* wp = w64.const_data_ptr<double>();
  const double* bp = b64.const_data_ptr<double>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effvit::shift_group_norm", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using stats_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = xv.const_data_ptr<scalar_t>();
    scalar_t* sp = sv.mutable_data_ptr<scalar_t>();
    scalar_t* yp = yv.mutable_data_ptr<scalar_t>();
    stats_t* mp = mean.mutable_data_ptr<stats_t>();
    stats_t* rp = rstd.mutable_data_ptr<stats_t>();
    const Strides4 xs = strides_of(xv), ss = strides_of(sv), ys = strides_of(yv);
    // coefficients y = s * a[b, c] + shift[b, c]
    std::vector<opmath_t> coef(2 * B * C);

    auto finish_sample = [&](int64_t b, double sum, double sum_sq) {
      const SampleMoments m = moments_from_sums(sum, sum_sq, count, eps);
      mp[b] = static_cast<stats_t>(m.mean);
      rp[b] = static_cast<stats_t>(m.rstd);
      opmath_t* a = coef.data() + 2 * b * C;
      for (int64_t c = 0; c < C; ++c) {
        const double ac = m.rstd * wp[c];
        a[c] = static_cast<opmath_t>(ac);
        a[C + c] = static_cast<opmath_t>(bp[c] - m.mean * ac);
      }
    };
    auto normalize = [&](int64_t b, int64_t l0, int64_t l1) {
      const opmath_t* a = coef.data() + 2 * b * C;
      affine_lines(sp, ss, yp, ys, plain_walk, b, l0, l1, a, a + C);
    };

    if (tasks.per_sample == 1) {
      // one task per sample: both passes while the sample is in cache
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          double sums[2] = {0, 0};
          shift_lines(std::true_type{}, xp, xs, sp, ss, shift_walk, b, int64_t(0), shift_walk.lines_per_sample(), sums);
          finish_sample(b, sums[0], sums[1]);
          normalize(b, 0, shift_walk.lines_per_sample());
        }
      });
    } else {
      std::vector<double> partial(2 * B * tasks.per_sample, 0.0);
      for_each_task(shift_walk, tasks, [&](int64_t task, int64_t b, int64_t l0, int64_t l1) {
        shift_lines(std::true_type{}, xp, xs, sp, ss, shift_walk, b, l0, l1, partial.data() + 2 * task);
      });
      for (int64_t b = 0; b < B; ++b) {
        double sum = 0, sum_sq = 0;
        for (int64_t t = b * tasks.per_sample; t < (b + 1) * tasks.per_sample; ++t)
          sum += partial[2 * t], sum_sq += partial[2 * t + 1];
        finish_sample(b, sum, sum_sq);
      }
      for_each_task(shift_walk, tasks, [&](int64_t, int64_t b, int64_t l0, int64_t l1) { normalize(b, l0, l1); });
    }
  });
  return {shifted, normalized, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shift_group_norm_backward_cpu(
    const std::optional<at::Tensor>& grad_shifted_opt, const at::Tensor& grad_normalized, const at::Tensor& shifted,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd, int64_t n_div, bool channels_last) {
  const int64_t group = check_shift_input(shifted, n_div, channels_last, "shifted");
  check_same_device_dtype(grad_normalized, shifted, "grad_normalized", "shifted");
  TORCH_CHECK_VALUE(grad_normalized.sizes() == shifted.sizes(), "grad_normalized has shape ",
                    grad_normalized.sizes(), " but shifted has shape ", shifted.sizes());
  const at::Tensor* grad_shifted = grad_shifted_opt.has_value() && grad_shifted_opt->defined() ? &*grad_shifted_opt : nullptr;
  if (grad_shifted) {
    check_same_device_dtype(*grad_shifted, shifted, "grad_shifted", "shifted");
    TORCH_CHECK_VALUE(grad_shifted->sizes() == shifted.sizes(), "grad_shifted has shape ", grad_shifted->sizes(),
                      " but shifted has shape ", shifted.sizes());
  }
  const at::Tensor sv = as_bchw(shifted, channels_last);
  const int64_t B = sv.size(0), C = sv.size(1);
  check_channel_vector(weight, shifted, C, "weight");
  TORCH_CHECK_VALUE(mean.numel() == B && rstd.numel() == B, "mean and rstd must have B = ", B,
                    " values, got ", mean.numel(), " and ", rstd.numel());

  at::Tensor grad_x = at::empty_like(shifted);
  at::Tensor grad_weight = at::zeros({C}, weight.options()), grad_bias = at::zeros({C}, weight.options());
  if (B == 0 || sv.numel() == 0) {
    grad_x.zero_();
    return {grad_x, grad_weight, grad_bias};
  }
  const at::Tensor gyv = as_bchw(grad_normalized, channels_last), dxv = as_bchw(grad_x, channels_last);
  const at::Tensor gsv = grad_shifted ? as_bchw(*grad_shifted, channels_last) : at::Tensor();
  LineWalk sum_walk = make_walk(sv, 0, false);
  const LineWalk grad_walk = make_walk(dxv, group, /*reverse=*/true);
  const Tasks sum_tasks = make_tasks(sum_walk), grad_tasks = make_tasks(grad_walk);
  const double count = static_cast<double>(sv.numel() / B);
  const at::Tensor w64 = weight.to(at::kDouble).contiguous();
  const at::Tensor mean64 = mean.to(at::kDouble).contiguous(), rstd64 = rstd.to(at::kDouble).contiguous();
  const double* wp = w64.const_data_ptr<double>();
  const double* mp = mean64.const_data_ptr<double>();
  const double* rp = rstd64.const_data_ptr<double>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, shifted.scalar_type(), "effvit::shift_group_norm_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = sv.const_data_ptr<scalar_t>();
    const scalar_t* gyp = gyv.const_data_ptr<scalar_t>();
    const scalar_t* gsp = grad_shifted ? gsv.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dxp = dxv.mutable_data_ptr<scalar_t>();
    const Strides4 ss = strides_of(sv), gys = strides_of(gyv), dxs = strides_of(dxv);
    const Strides4 gss = grad_shifted ? strides_of(gsv) : Strides4{0, 0, 0, 0};

    // pass 1: A[c], G[c] per task, then per sample
    std::vector<double> partial(2 * C * B * sum_tasks.per_sample, 0.0);
    for_each_task(sum_walk, sum_tasks, [&](int64_t task, int64_t b, int64_t l0, int64_t l1) {
      channel_sums(gyp, gys, sp, ss, sum_walk, b, l0, l1, partial.data() + 2 * C * task);
    });
    std::vector<double> dgamma(C, 0.0), dbeta(C, 0.0);
    std::vector<opmath_t> p(B * C);
    std::vector<GroupNormBackwardCoeffs> qr(B);
    for (int64_t b = 0; b < B; ++b) {
      double s1 = 0, s2 = 0;
      for (int64_t c = 0; c < C; ++c) {
        double a_sum = 0, g_sum = 0;
        for (int64_t t = b * sum_tasks.per_sample; t < (b + 1) * sum_tasks.per_sample; ++t)
          a_sum += partial[2 * (C * t + c)], g_sum += partial[2 * (C * t + c) + 1];
        const double centered = rp[b] * (a_sum - mp[b] * g_sum);  // sum dy * xhat
        dgamma[c] += centered;
        dbeta[c] += g_sum;
        s1 += wp[c] * g_sum;
        s2 += wp[c] * centered;
        p[b * C + c] = static_cast<opmath_t>(rp[b] * wp[c]);
      }
      qr[b] = group_norm_backward_coeffs(s1, s2, mp[b], rp[b], count);
    }
    // pass 2: dx = reverse_shift(g_s + p * g_y + q + r * s)
    for_each_task(grad_walk, grad_tasks, [&](int64_t, int64_t b, int64_t l0, int64_t l1) {
      shift_grad_lines(gsp, gss, gyp, gys, sp, ss, dxp, dxs, grad_walk, b, l0, l1,
                                           p.data() + b * C, static_cast<opmath_t>(qr[b].q),
                                           static_cast<opmath_t>(qr[b].r));
    });
    grad_weight.copy_(at::from_blob(dgamma.data(), {C}, at::kDouble));
    grad_bias.copy_(at::from_blob(dbeta.data(), {C}, at::kDouble));
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(effvit, CPU, m) {
  m.impl("shift", &shift_cpu);
  m.impl("shift_group_norm", &shift_group_norm_cpu);
  m.impl("shift_group_norm_backward", &shift_group_norm_backward_cpu);
}

}  // namespace cpu
}  // namespace effvit
