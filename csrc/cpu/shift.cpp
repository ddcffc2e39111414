// ShiftViT shift and the fused shift + GroupNorm(1, C): CPU kernels.
//
// Every kernel walks its output as "lines" along the innermost memory dimension: one row of one
// channel (W values, NCHW memory) or one pixel (C values, channels-last memory). Shifting a line
// splits it into at most five segments, each either copied from one neighbouring line or zero, so the
// inner loops are plain strided copies (memcpy when both sides are contiguous) whatever the layout and
// strides of the tensors.
//
// The GroupNorm forward reads x twice (statistics, then outputs: from cache, when a task is a whole
// sample) and writes each output once; no output is read back.
//
// Work is cut into tasks of whole lines of one sample. When the samples share out evenly among the
// threads, one task is a whole sample, so the GroupNorm passes re-read a sample while it is still in
// cache; otherwise each sample is split into runs of lines holding equal numbers of values, at least
// kMinTaskElements a task.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <cstring>
#include <cmath>
#include <vector>

#include "../common/group_norm_math.h"
#include "../common/shift_checks.h"
#include "../common/shift_geometry.h"
#include "cpu_isa.h"

namespace effvit {
namespace cpu {
namespace {

constexpr int64_t kMinTaskElements = 1 << 13;  // values per task when samples are split
constexpr int64_t kRunElements = 1 << 14;      // values per line of whole planes, when samples are not split

// Whole samples as tasks: when they share out evenly among the threads (or nearly, when many).
bool sample_tasks(int64_t B) {
  const int64_t threads = at::get_num_threads();
  return B >= threads && (B % threads == 0 || B >= 4 * threads);
}

// Strides of a logical [B, C, H, W] tensor.
struct Strides4 {
  int64_t b, c, h, w;
  int64_t offset(int64_t b_, int64_t c_, int64_t h_, int64_t w_) const { return b_ * b + c_ * c + h_ * h + w_ * w; }
};

Strides4 strides_of(const at::Tensor& bchw) {
  return {bchw.stride(0), bchw.stride(1), bchw.stride(2), bchw.stride(3)};
}

// How a [B, C, H, W] tensor is walked, and the shift applied while walking.
//   kPlanes: lines are runs of whole channel planes of one shift group, when rows follow each other in
//            memory (NCHW): a shift is then one flat copy plus a row or column of zeros per plane
//   kRow:    one line per row of one channel (W values), for any other strides
//   kPixel:  one line per pixel (C values), when channels are innermost in memory (channels-last)
// A walk with shift == false visits the same lines without moving anything, so passes over the input
// and over the output of one op share a partition into tasks.
enum class WalkKind { kPlanes, kRow, kPixel };

struct LineWalk {
  int64_t B, C, H, W;
  int64_t group;         // C / n_div
  bool shift;            // apply the shift (else an identity walk over the same lines)
  bool reverse;          // the adjoint shift
  WalkKind kind;
  int64_t run_planes;    // kPlanes: planes per line (1 unless channel planes follow each other too)

  int64_t lines_per_sample() const {
    if (kind == WalkKind::kRow) return C * H;
    if (kind == WalkKind::kPixel) return H * W;
    int64_t lines = 0;
    for (int64_t k = 0; k < 5; ++k) {
      int64_t c0, c1;
      shift_group_range(k, group, C, &c0, &c1);
      if (c1 > c0) lines += (c1 - c0 + run_planes - 1) / run_planes;
    }
    return lines;
  }
  int64_t max_length() const { return kind == WalkKind::kPlanes ? run_planes * H * W : kind == WalkKind::kRow ? W : C; }
  int64_t inner_stride(const Strides4& s) const { return kind == WalkKind::kPixel ? s.c : s.w; }
  ShiftOffset offset(int64_t c) const { return shift ? shift_offset(c, group, reverse) : ShiftOffset{0, 0}; }
};

struct Segment {
  int64_t start, len;  // position along the line
  bool valid;          // false: the segment is zero fill
  int64_t c, h, w;     // source coordinates of the segment's first value
};

// A line: up to five segments, then (kPlanes) a row or a column of zeros in each of its planes, which
// a flat copy filled with values from the neighbouring plane or row.
struct Line {
  int64_t c, h, w;  // coordinates of the line's first value
  int64_t planes;   // channel planes in the line (kPlanes), else 1
  int64_t length;
  int n;
  Segment seg[5];
  int64_t zero_row, zero_col;  // -1: none
};

EFFVIT_ALWAYS_INLINE void make_line(const LineWalk& lw, int64_t l, Line* line) {
  line->n = 0;
  line->planes = 1;
  line->zero_row = line->zero_col = -1;
  if (lw.kind == WalkKind::kPixel) {
    const int64_t h = l / lw.W, w = l % lw.W;
    line->c = 0, line->h = h, line->w = w, line->length = lw.C;
    for (int64_t k = 0; k < 5; ++k) {
      int64_t c0, c1;
      shift_group_range(k, lw.group, lw.C, &c0, &c1);
      if (c1 <= c0) continue;
      const ShiftOffset off = lw.offset(c0);
      const int64_t sh = h + off.dh, sw = w + off.dw;
      const bool valid = sh >= 0 && sh < lw.H && sw >= 0 && sw < lw.W;
      line->seg[line->n++] = {c0, c1 - c0, valid, c0, sh, sw};
    }
    return;
  }
  if (lw.kind == WalkKind::kRow) {
    const int64_t c = l / lw.H, h = l % lw.H;
    line->c = c, line->h = h, line->w = 0, line->length = lw.W;
    const ShiftOffset off = lw.offset(c);
    const int64_t sh = h + off.dh;
    if (sh < 0 || sh >= lw.H) {
      line->seg[line->n++] = {0, lw.W, false, c, 0, 0};
      return;
    }
    const int64_t lo = std::max<int64_t>(0, -off.dw), hi = std::min<int64_t>(lw.W, lw.W - off.dw);
    if (lo > 0) line->seg[line->n++] = {0, lo, false, c, 0, 0};
    if (hi > lo) line->seg[line->n++] = {lo, hi - lo, true, c, sh, lo + off.dw};
    if (hi < lw.W) line->seg[line->n++] = {hi, lw.W - hi, false, c, 0, 0};
    return;
  }
  // kPlanes: find the run, then out[i] = x[i + d] over the flattened planes of the run
  int64_t c = 0, planes = 1;
  for (int64_t k = 0, rest = l; k < 5; ++k) {
    int64_t c0, c1;
    shift_group_range(k, lw.group, lw.C, &c0, &c1);
    if (c1 <= c0) continue;
    const int64_t runs = (c1 - c0 + lw.run_planes - 1) / lw.run_planes;
    if (rest < runs) {
      c = c0 + rest * lw.run_planes;
      planes = std::min(lw.run_planes, c1 - c);
      break;
    }
    rest -= runs;
  }
  const int64_t n = planes * lw.H * lw.W;
  line->c = c, line->h = 0, line->w = 0, line->planes = planes, line->length = n;
  const ShiftOffset off = lw.offset(c);
  const int64_t d = off.dh * lw.W + off.dw;
  const int64_t lo = std::clamp<int64_t>(-d, 0, n), hi = std::clamp<int64_t>(n - d, lo, n);
  if (lo > 0) line->seg[line->n++] = {0, lo, false, c, 0, 0};
  if (hi > lo) line->seg[line->n++] = {lo, hi - lo, true, c + (lo + d) / (lw.H * lw.W), ((lo + d) / lw.W) % lw.H, (lo + d) % lw.W};
  if (hi < n) line->seg[line->n++] = {hi, n - hi, false, c, 0, 0};
  if (off.dh != 0) line->zero_row = off.dh > 0 ? lw.H - 1 : 0;
  if (off.dw != 0) line->zero_col = off.dw > 0 ? lw.W - 1 : 0;
}

template <typename T>
EFFVIT_ALWAYS_INLINE void fill_zero(T* dst, int64_t stride, int64_t n) {
  if (stride == 1) {
    std::memset(static_cast<void*>(dst), 0, n * sizeof(T));
    return;
  }
  for (int64_t j = 0; j < n; ++j) dst[j * stride] = T(0);
}

// Calls fn(position along the line) for each value of a kPlanes line that its flat copy took from the
// neighbouring row or plane, and that the shift makes zero: a row or a column of each plane.
template <typename F>
EFFVIT_ALWAYS_INLINE void for_each_wrapped(const LineWalk& lw, const Line& line, F&& fn) {
  if (line.zero_row < 0 && line.zero_col < 0) return;
  for (int64_t p = 0; p < line.planes; ++p) {
    const int64_t plane = p * lw.H * lw.W;
    if (line.zero_row >= 0)
      for (int64_t w = 0; w < lw.W; ++w) fn(plane + line.zero_row * lw.W + w);
    if (line.zero_col >= 0)
      for (int64_t h = 0; h < lw.H; ++h) fn(plane + h * lw.W + line.zero_col);
  }
}

template <typename T>
EFFVIT_ALWAYS_INLINE void zero_edges(const LineWalk& lw, const Line& line, T* line_start, int64_t stride) {
  for_each_wrapped(lw, line, [&](int64_t pos) { line_start[pos * stride] = T(0); });
}

// Large copies in vector moves of the running variant's width. glibc's memcpy copies these sizes with `rep movsb`,
// which is markedly slower than vector stores into freshly mapped pages, as every output above glibc's mmap
// threshold is (the same speed on reused memory).
template <int kBytes>
EFFVIT_ALWAYS_INLINE void copy_bytes_pass(char* __restrict dst, const char* __restrict src, int64_t n) {
  using V = typename VecN<kBytes, char>::type;
  int64_t i = 0;
  for (; i + kBytes <= n; i += kBytes) {
    V v;
    __builtin_memcpy(&v, src + i, kBytes);
    asm("" : "+v"(v));  // a loop of plain moves, which GCC would turn back into the memcpy call
    __builtin_memcpy(dst + i, &v, kBytes);
  }
  std::memcpy(dst + i, src + i, n - i);
}

#if EFFVIT_CPU_ISA_DISPATCH
EFFVIT_TARGET_AVX512 void copy_bytes_avx512(char* dst, const char* src, int64_t n) { copy_bytes_pass<64>(dst, src, n); }
EFFVIT_TARGET_AVX2 void copy_bytes_avx2(char* dst, const char* src, int64_t n) { copy_bytes_pass<32>(dst, src, n); }
#endif

void copy_bytes(void* dst, const void* src, int64_t n) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
#if EFFVIT_CPU_ISA_DISPATCH
  switch (cpu::cpu_isa()) {
    case cpu::CpuIsa::kAvx512: return copy_bytes_avx512(d, s, n);
    case cpu::CpuIsa::kAvx2: return copy_bytes_avx2(d, s, n);
    default: return copy_bytes_pass<16>(d, s, n);
  }
#else
  std::memcpy(d, s, n);
#endif
}

template <typename T>
EFFVIT_ALWAYS_INLINE void copy_values(T* dst, int64_t dst_stride, const T* src, int64_t src_stride, int64_t n) {
  if (dst_stride == 1 && src_stride == 1) {
    if (n >= 256) {
      copy_bytes(static_cast<void*>(dst), static_cast<const void*>(src), n * static_cast<int64_t>(sizeof(T)));
    } else {  // short segments (pixels of channels-last tensors): no call
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dst[j] = src[j];
    }
    return;
  }
  for (int64_t j = 0; j < n; ++j) dst[j * dst_stride] = src[j * src_stride];
}

// Writes the shifted line l of sample b into dst (stride dst_stride): copies, zero fill, wrapped edges.
template <typename T>
EFFVIT_ALWAYS_INLINE void write_shifted_line(const LineWalk& lw, const Line& line, const T* x, const Strides4& xs,
                                             int64_t b, T* dst, int64_t dst_stride) {
  const int64_t xi = lw.inner_stride(xs);
  for (int i = 0; i < line.n; ++i) {
    const Segment& sg = line.seg[i];
    if (sg.valid) copy_values(dst + sg.start * dst_stride, dst_stride, x + xs.offset(b, sg.c, sg.h, sg.w), xi, sg.len);
    else fill_zero(dst + sg.start * dst_stride, dst_stride, sg.len);
  }
  zero_edges(lw, line, dst, dst_stride);
}

// Lines of whole planes when, in every tensor the op touches, rows follow each other in memory (and
// runs of several planes when planes follow each other too); else rows, or pixels for channels-last.
LineWalk make_walk(const at::Tensor& out_bchw, std::initializer_list<const at::Tensor*> others, int64_t group,
                   bool shift, bool reverse) {
  const int64_t B = out_bchw.size(0), C = out_bchw.size(1), H = out_bchw.size(2), W = out_bchw.size(3);
  if (C > 1 && out_bchw.stride(1) < out_bchw.stride(3)) return {B, C, H, W, group, shift, reverse, WalkKind::kPixel, 1};
  bool rows_follow = true, planes_follow = true;
  auto visit = [&](const at::Tensor& t) {
    rows_follow = rows_follow && (H == 1 || t.stride(2) == W * t.stride(3));
    planes_follow = planes_follow && (C == 1 || t.stride(1) == H * W * t.stride(3));
  };
  visit(out_bchw);
  for (const at::Tensor* t : others)
    if (t != nullptr && t->defined()) visit(*t);
  if (!rows_follow) return {B, C, H, W, group, shift, reverse, WalkKind::kRow, 1};
  const int64_t run = planes_follow ? std::max<int64_t>(1, kRunElements / std::max<int64_t>(H * W, 1)) : 1;
  return {B, C, H, W, group, shift, reverse, WalkKind::kPlanes, run};
}

// ---- shift: out = shift(x) ----------------------------------------------------------------------------

template <typename scalar_t>
EFFVIT_ALWAYS_INLINE void shift_lines_body(const scalar_t* x, Strides4 xs, scalar_t* out, Strides4 os, LineWalk lw,
                                           int64_t b, int64_t l_begin, int64_t l_end) {
  const int64_t oi = lw.inner_stride(os);
  Line line;
  for (int64_t l = l_begin; l < l_end; ++l) {
    make_line(lw, l, &line);
    write_shifted_line(lw, line, x, xs, b, out + os.offset(b, line.c, line.h, line.w), oi);
  }
}
EFFVIT_CPU_ISA_VARIANTS(shift_lines, shift_lines_body)

// ---- GroupNorm statistics of shift(x), read from x alone ------------------------------------------------

// Double-precision reductions over 8 lanes (GCC does not vectorise `omp simd reduction` on doubles fed by floats),
// held as kPieces vectors of the running variant's register width: one AVX-512 register, two AVX2 or four SSE2
// ones. (One 64-byte vector type in the AVX2 variant has no register mode and lives on the stack: measured 3.5x
// slower.) Lanes are added in a fixed order, so every ISA variant gives the same bits.
// Values [0, 8 / kPieces) of p as doubles (an out-parameter: returning a vector wider than the variant's registers
// would change the ABI).
template <int kPieces, typename T, typename P>
EFFVIT_ALWAYS_INLINE void load_f64(const T* p, P* out) {
  constexpr int kLanes = 8 / kPieces;
  if constexpr (std::is_same_v<T, double>) {
    std::memcpy(out, p, sizeof(P));
  } else if constexpr (std::is_same_v<T, float> && kLanes >= 4) {
    typename VecN<kLanes * 4, float>::type f;
    std::memcpy(&f, p, sizeof(f));
    *out = __builtin_convertvector(f, P);
  } else {
    for (int k = 0; k < kLanes; ++k) (*out)[k] = static_cast<float>(p[k]);
  }
}

template <int kPieces, typename T>
EFFVIT_ALWAYS_INLINE int64_t add_sums_pass(const T* a, const T* b, int64_t n, double* sum, double* sum_ab) {
  constexpr int kLanes = 8 / kPieces;
  using P = typename VecN<64 / kPieces, double>::type;
  P s[kPieces] = {}, sp[kPieces] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int p = 0; p < kPieces; ++p) {
      P va, vb;
      load_f64<kPieces>(a + j + p * kLanes, &va);
      if (a == b) vb = va;
      else load_f64<kPieces>(b + j + p * kLanes, &vb);
      s[p] += va;
      sp[p] += va * vb;
    }
  for (int k = 0; k < 8; ++k) *sum += s[k / kLanes][k % kLanes], *sum_ab += sp[k / kLanes][k % kLanes];
  return j;
}

// *sum += sum of a, *sum_ab += sum of a * b over n values (b == nullptr: b = a).
template <typename T>
EFFVIT_ALWAYS_INLINE void add_sums(const T* a, const T* b, int64_t stride_a, int64_t stride_b, int64_t n,
                                   double* sum, double* sum_ab) {
  using opmath_t = at::opmath_type<T>;
  if (b == nullptr) b = a, stride_b = stride_a;
  int64_t j = 0;
  if (stride_a == 1 && stride_b == 1) {
    switch (cpu::cpu_isa()) {  // the variant running this code
      case cpu::CpuIsa::kAvx512: j = add_sums_pass<1>(a, b, n, sum, sum_ab); break;
      case cpu::CpuIsa::kAvx2: j = add_sums_pass<2>(a, b, n, sum, sum_ab); break;
      default: j = add_sums_pass<4>(a, b, n, sum, sum_ab); break;
    }
  }
  double tail = 0, tail_ab = 0;
  for (; j < n; ++j) {
    const double va = static_cast<opmath_t>(a[j * stride_a]), vb = static_cast<opmath_t>(b[j * stride_b]);
    tail += va;
    tail_ab += va * vb;
  }
  *sum += tail, *sum_ab += tail_ab;
}

// Adds the sum and the sum of squares of the shifted values of lines [l_begin, l_end) to sums[0..1]:
// the valid segments' sources, less the values a kPlanes flat copy would take across a row or plane edge.
template <typename scalar_t>
EFFVIT_ALWAYS_INLINE void shifted_sums_body(const scalar_t* x, Strides4 xs, LineWalk lw, int64_t b, int64_t l_begin,
                                            int64_t l_end, double* sums) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t xi = lw.inner_stride(xs);
  double sum = 0, sum_sq = 0;
  Line line;
  for (int64_t l = l_begin; l < l_end; ++l) {
    make_line(lw, l, &line);
    for (int i = 0; i < line.n; ++i) {
      const Segment& sg = line.seg[i];
      if (!sg.valid) continue;
      const scalar_t* src = x + xs.offset(b, sg.c, sg.h, sg.w);
      double seg_sum = 0, seg_sq = 0;
      add_sums<scalar_t>(src, nullptr, xi, 0, sg.len, &seg_sum, &seg_sq);
      double wrap_sum = 0, wrap_sq = 0;
      for_each_wrapped(lw, line, [&](int64_t pos) {
        if (pos >= sg.start && pos < sg.start + sg.len) {
          const double v = static_cast<opmath_t>(src[(pos - sg.start) * xi]);
          wrap_sum += v;
          wrap_sq += v * v;
        }
      });
      if (!std::isfinite(wrap_sum + wrap_sq)) {
        // an inf or NaN shifted out over the edge: it must not reach the statistics, so sum the values that stay
        std::vector<bool> dropped(sg.len, false);
        for_each_wrapped(lw, line, [&](int64_t pos) {
          if (pos >= sg.start && pos < sg.start + sg.len) dropped[pos - sg.start] = true;
        });
        seg_sum = seg_sq = wrap_sum = wrap_sq = 0;
        for (int64_t j = 0; j < sg.len; ++j) {
          if (dropped[j]) continue;
          const double v = static_cast<opmath_t>(src[j * xi]);
          seg_sum += v;
          seg_sq += v * v;
        }
      }
      sum += seg_sum - wrap_sum;
      sum_sq += seg_sq - wrap_sq;
    }
  }
  sums[0] += sum, sums[1] += sum_sq;
}
EFFVIT_CPU_ISA_VARIANTS(shifted_sums, shifted_sums_body)

// Calls fn(offset along the line, count, channel, channel step) for the pieces of a line [begin, end)
// over which the channel is constant (channel step 0) or advances by one per value (pixels).
template <typename F>
EFFVIT_ALWAYS_INLINE void for_each_channel_piece(const LineWalk& lw, const Line& line, int64_t begin, int64_t end,
                                                 F&& fn) {
  if (lw.kind == WalkKind::kPixel) {
    fn(begin, end - begin, begin, int64_t(1));
  } else if (lw.kind == WalkKind::kRow) {
    fn(begin, end - begin, line.c, int64_t(0));
  } else {
    const int64_t hw = lw.H * lw.W;
    for (int64_t pos = begin; pos < end;) {
      const int64_t stop = std::min(end, (pos / hw + 1) * hw);
      fn(pos, stop - pos, line.c + pos / hw, int64_t(0));
      pos = stop;
    }
  }
}

// ---- shift and normalize: s = shift(x), y = s * a[c] + shift[c] --------------------------------------

// Each line is shifted into s, then normalized from it while it is in cache.
template <typename scalar_t, typename opmath_t>
EFFVIT_ALWAYS_INLINE void shift_affine_lines_body(const scalar_t* x, Strides4 xs, scalar_t* s, Strides4 ss,
                                                  scalar_t* y, Strides4 ys, LineWalk lw, int64_t b, int64_t l_begin,
                                                  int64_t l_end, const opmath_t* a, const opmath_t* shift) {
  const int64_t si = lw.inner_stride(ss), yi = lw.inner_stride(ys);
  Line line;
  for (int64_t l = l_begin; l < l_end; ++l) {
    make_line(lw, l, &line);
    scalar_t* s_line = s + ss.offset(b, line.c, line.h, line.w);
    scalar_t* y_line = y + ys.offset(b, line.c, line.h, line.w);
    write_shifted_line(lw, line, x, xs, b, s_line, si);
    for_each_channel_piece(lw, line, 0, line.length, [&](int64_t pos, int64_t n, int64_t c, int64_t cstep) {
      const scalar_t* in = s_line + pos * si;
      scalar_t* out = y_line + pos * yi;
      if (cstep == 1) {
        for (int64_t j = 0; j < n; ++j)
          out[j * yi] = static_cast<scalar_t>(static_cast<opmath_t>(in[j * si]) * a[c + j] + shift[c + j]);
        return;
      }
      const opmath_t ac = a[c], sc = shift[c];
      if (si == 1 && yi == 1) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) out[j] = static_cast<scalar_t>(static_cast<opmath_t>(in[j]) * ac + sc);
      } else {
        for (int64_t j = 0; j < n; ++j) out[j * yi] = static_cast<scalar_t>(static_cast<opmath_t>(in[j * si]) * ac + sc);
      }
    });
  }
}
EFFVIT_CPU_ISA_VARIANTS(shift_affine_lines, shift_affine_lines_body)

// ---- backward pass 1: per-channel sums A[c] = sum dy * s and G[c] = sum dy -------------------------

template <typename scalar_t>
EFFVIT_ALWAYS_INLINE void channel_sums_body(const scalar_t* dy, Strides4 ds, const scalar_t* s, Strides4 ss,
                                            LineWalk lw, int64_t b, int64_t l_begin, int64_t l_end,
                                            double* acc /* [C][2]: A, G */) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t di = lw.inner_stride(ds), si = lw.inner_stride(ss);
  Line line;
  for (int64_t l = l_begin; l < l_end; ++l) {
    make_line(lw, l, &line);
    const scalar_t* g0 = dy + ds.offset(b, line.c, line.h, line.w);
    const scalar_t* v0 = s + ss.offset(b, line.c, line.h, line.w);
    for_each_channel_piece(lw, line, 0, line.length, [&](int64_t pos, int64_t n, int64_t c, int64_t cstep) {
      const scalar_t* g = g0 + pos * di;
      const scalar_t* v = v0 + pos * si;
      if (cstep == 1) {
        for (int64_t j = 0; j < n; ++j) {
          const double gj = static_cast<opmath_t>(g[j * di]);
          acc[2 * (c + j)] += gj * static_cast<opmath_t>(v[j * si]);
          acc[2 * (c + j) + 1] += gj;
        }
        return;
      }
      double a_sum = 0, g_sum = 0;
      add_sums<scalar_t>(g, v, di, si, n, &g_sum, &a_sum);
      acc[2 * c] += a_sum;
      acc[2 * c + 1] += g_sum;
    });
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
      if (!sg.valid) {
        fill_zero(o + sg.start * oi, oi, sg.len);
        continue;
      }
      // the segment's sources follow each other in every tensor (same walk), so offsets along the
      // line map to offsets from the segment's first source
      const scalar_t* gy0 = gy + gys.offset(b, sg.c, sg.h, sg.w) - sg.start * gyi;
      const scalar_t* v0 = s + ss.offset(b, sg.c, sg.h, sg.w) - sg.start * si;
      const scalar_t* gs0 = gs ? gs + gss.offset(b, sg.c, sg.h, sg.w) - sg.start * gsi : nullptr;
      // a shift never changes the channel: the destination's channel indexes p
      for_each_channel_piece(lw, line, sg.start, sg.start + sg.len, [&](int64_t pos, int64_t n, int64_t c, int64_t cstep) {
        const scalar_t* g_y = gy0 + pos * gyi;
        const scalar_t* v = v0 + pos * si;
        const scalar_t* g_s = gs0 ? gs0 + pos * gsi : nullptr;
        scalar_t* dst = o + pos * oi;
        if (cstep == 0 && gyi == 1 && si == 1 && oi == 1 && (!g_s || gsi == 1)) {
          const opmath_t pv = p[c];
          if (g_s) {
#pragma omp simd
            for (int64_t j = 0; j < n; ++j)
              dst[j] = static_cast<scalar_t>(static_cast<opmath_t>(g_s[j]) + pv * static_cast<opmath_t>(g_y[j]) + q +
                                             r * static_cast<opmath_t>(v[j]));
          } else {
#pragma omp simd
            for (int64_t j = 0; j < n; ++j)
              dst[j] = static_cast<scalar_t>(pv * static_cast<opmath_t>(g_y[j]) + q + r * static_cast<opmath_t>(v[j]));
          }
          return;
        }
        for (int64_t j = 0; j < n; ++j) {
          opmath_t t = p[c + j * cstep] * static_cast<opmath_t>(g_y[j * gyi]) + q + r * static_cast<opmath_t>(v[j * si]);
          if (g_s) t += static_cast<opmath_t>(g_s[j * gsi]);
          dst[j * oi] = static_cast<scalar_t>(t);
        }
      });
    }
    zero_edges(lw, line, o, oi);
  }
}
EFFVIT_CPU_ISA_VARIANTS(shift_grad_lines, shift_grad_lines_body)

// ---- task partition ------------------------------------------------------------------------------

struct Tasks {
  int64_t per_sample;           // tasks per sample
  std::vector<int64_t> bounds;  // task k of a sample runs lines [bounds[k], bounds[k + 1])
};

Tasks make_tasks(const LineWalk& lw) {
  const int64_t lps = lw.lines_per_sample();
  if (sample_tasks(lw.B) || lps <= 1) return {1, {0, lps}};
  // two tasks a thread, each at least kMinTaskElements values, cut where the values divide evenly
  std::vector<int64_t> ends(lps);  // values up to the end of each line
  Line line;
  int64_t total = 0;
  for (int64_t l = 0; l < lps; ++l) {
    make_line(lw, l, &line);
    ends[l] = total += line.length;
  }
  const int64_t threads = at::get_num_threads();
  int64_t per_sample = (2 * threads + lw.B - 1) / lw.B;
  per_sample = std::clamp<int64_t>(per_sample, 1, std::max<int64_t>(1, std::min(lps, total / kMinTaskElements)));
  std::vector<int64_t> bounds{0};
  for (int64_t k = 1; k < per_sample; ++k) {
    const int64_t target = total * k / per_sample;
    const int64_t l = std::lower_bound(ends.begin(), ends.end(), target) - ends.begin() + 1;
    if (l > bounds.back() && l < lps) bounds.push_back(l);
  }
  bounds.push_back(lps);
  return {static_cast<int64_t>(bounds.size()) - 1, bounds};
}

// Runs fn(task, b, l_begin, l_end) over every task in parallel.
template <typename F>
void for_each_task(const LineWalk& lw, const Tasks& t, const F& fn) {
  at::parallel_for(0, lw.B * t.per_sample, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / t.per_sample, k = task % t.per_sample;
      fn(task, b, t.bounds[k], t.bounds[k + 1]);
    }
  });
}

// ---- ops -----------------------------------------------------------------------------------------

at::Tensor shift_cpu(const at::Tensor& x, int64_t n_div, bool nhwc, bool reverse) {
  const int64_t group = check_shift_input(x, n_div, nhwc);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const at::Tensor xv = as_bchw(x, nhwc), ov = as_bchw(out, nhwc);
  const LineWalk lw = make_walk(ov, {&xv}, group, true, reverse);
  const Tasks tasks = make_tasks(lw);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effvit::shift", [&] {
    const scalar_t* xp = xv.const_data_ptr<scalar_t>();
    scalar_t* op = ov.mutable_data_ptr<scalar_t>();
    const Strides4 xs = strides_of(xv), os = strides_of(ov);
    for_each_task(lw, tasks, [&](int64_t, int64_t b, int64_t l0, int64_t l1) {
      shift_lines(xp, xs, op, os, lw, b, l0, l1);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> shift_group_norm_cpu(const at::Tensor& x, int64_t n_div,
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

  const at::Tensor sv = as_bchw(shifted, nhwc), yv = as_bchw(normalized, nhwc);
  const LineWalk walk = make_walk(sv, {&xv, &yv}, group, true, false);
  const Tasks tasks = make_tasks(walk);
  const int64_t lps = walk.lines_per_sample();
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
    std::vector<opmath_t> coef(2 * B * C);  // y = s * coef[b][0][c] + coef[b][1][c]

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
    auto write_outputs = [&](int64_t b, int64_t l0, int64_t l1) {
      const opmath_t* a = coef.data() + 2 * b * C;
      shift_affine_lines(xp, xs, sp, ss, yp, ys, walk, b, l0, l1, a, a + C);
    };

    // pass 1 reads x for the statistics; pass 2 reads it again (from cache when a task is a whole
    // sample) and writes both outputs, so neither output is read back
    if (tasks.per_sample == 1) {
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          double sums[2] = {0, 0};
          shifted_sums(xp, xs, walk, b, int64_t(0), lps, sums);
          finish_sample(b, sums[0], sums[1]);
          write_outputs(b, 0, lps);
        }
      });
    } else {
      std::vector<double> partial(2 * B * tasks.per_sample, 0.0);
      for_each_task(walk, tasks, [&](int64_t task, int64_t b, int64_t l0, int64_t l1) {
        shifted_sums(xp, xs, walk, b, l0, l1, partial.data() + 2 * task);
      });
      for (int64_t b = 0; b < B; ++b) {
        double sum = 0, sum_sq = 0;
        for (int64_t t = b * tasks.per_sample; t < (b + 1) * tasks.per_sample; ++t)
          sum += partial[2 * t], sum_sq += partial[2 * t + 1];
        finish_sample(b, sum, sum_sq);
      }
      for_each_task(walk, tasks, [&](int64_t, int64_t b, int64_t l0, int64_t l1) { write_outputs(b, l0, l1); });
    }
  });
  return {shifted, normalized, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shift_group_norm_backward_cpu(
    const std::optional<at::Tensor>& grad_shifted_opt, const at::Tensor& grad_normalized, const at::Tensor& shifted,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd, int64_t n_div, bool nhwc) {
  const at::Tensor* grad_shifted = nullptr;
  const int64_t group = check_shift_group_norm_backward(grad_shifted_opt, grad_normalized, shifted, weight, mean, rstd,
                                                        n_div, nhwc, &grad_shifted);
  const at::Tensor sv = as_bchw(shifted, nhwc);
  const int64_t B = sv.size(0), C = sv.size(1);

  at::Tensor grad_x = at::empty_like(shifted);
  at::Tensor grad_weight = at::zeros({C}, weight.options()), grad_bias = at::zeros({C}, weight.options());
  if (B == 0 || sv.numel() == 0) {
    grad_x.zero_();
    return {grad_x, grad_weight, grad_bias};
  }
  const at::Tensor gyv = as_bchw(grad_normalized, nhwc), dxv = as_bchw(grad_x, nhwc);
  const at::Tensor gsv = grad_shifted ? as_bchw(*grad_shifted, nhwc) : at::Tensor();
  const LineWalk sum_walk = make_walk(sv, {&gyv}, group, false, false);
  const LineWalk grad_walk = make_walk(dxv, {&gyv, &sv, &gsv}, group, true, /*reverse=*/true);
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
      shift_grad_lines(gsp, gss, gyp, gys, sp, ss, dxp, dxs, grad_walk, b, l0, l1, p.data() + b * C,
                       static_cast<opmath_t>(qr[b].q), static_cast<opmath_t>(qr[b].r));
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
