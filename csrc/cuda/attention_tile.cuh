// Shared helpers of the tiled attention kernels, used by csrc/cuda/window.cu (Swin window attention) and
// csrc/cuda/hilo.cu (HiLo's Lo-Fi attention): the lane split of a token row, shared-tile dot products and
// axpys, vectorised global row loads / stores, the two-tile loader, and the host's slice-width dispatch.
// A token row of head_dim values is split over G adjacent lanes of a warp, DPT values per lane; the other
// side's rows sit in shared memory as rows of hd_pad = G * DPT values of the accumulation type acc_t (float;
// double for double).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace effvit {
namespace cuda {
namespace attn {

// The block's dynamic shared memory (one declaration for every kernel and type).
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return smem_raw;
}

template <typename acc_t>
struct Vec4;
template <>
struct Vec4<float> {
  static __device__ __forceinline__ void load(const float* p, float (&v)[4]) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
  }
  static __device__ __forceinline__ void store(float* p, const float (&v)[4]) {
    *reinterpret_cast<float4*>(p) = float4{v[0], v[1], v[2], v[3]};
  }
};
template <>
struct Vec4<double> {
  static __device__ __forceinline__ void load(const double* p, double (&v)[4]) {
    const double2 a = reinterpret_cast<const double2*>(p)[0], b = reinterpret_cast<const double2*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
  }
  static __device__ __forceinline__ void store(double* p, const double (&v)[4]) {
    reinterpret_cast<double2*>(p)[0] = double2{v[0], v[1]};
    reinterpret_cast<double2*>(p)[1] = double2{v[2], v[3]};
  }
};

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t infinity() {
  return std::numeric_limits<acc_t>::infinity();
}

// A thread's share of a token row: value k of its DPT sits at head_dim index dim(k). Slices interleave in
// groups of four, so the G lanes of a row read adjacent 16-byte pieces of a shared row (no bank conflicts).
struct Lane {
  int32_t part, G;
  __device__ __forceinline__ int32_t dim(int k) const { return ((k >> 2) * G + part) * 4 + (k & 3); }
};

// Sum over the G lanes of a row (G divides 32 and rows start at multiples of G, so the xor stays inside).
template <typename acc_t>
__device__ __forceinline__ acc_t row_sum(acc_t x, int32_t G) {
  for (int offset = G / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// This lane's part of x . row, for a shared row of hd_pad values.
template <int DPT, typename acc_t>
__device__ __forceinline__ acc_t dot_row(const acc_t (&x)[DPT], const acc_t* row, const Lane& ln) {
  const acc_t* p = row + ln.part * 4;
  acc_t s = 0;
#pragma unroll
  for (int c = 0; c < DPT / 4; ++c) {
    acc_t v[4];
    Vec4<acc_t>::load(p + c * 4 * ln.G, v);
#pragma unroll
    for (int e = 0; e < 4; ++e) s += x[4 * c + e] * v[e];
  }
  return s;
}

// y += a * row, on this lane's part.
template <int DPT, typename acc_t>
__device__ __forceinline__ void axpy_row(acc_t a, const acc_t* row, acc_t (&y)[DPT], const Lane& ln) {
  const acc_t* p = row + ln.part * 4;
#pragma unroll
  for (int c = 0; c < DPT / 4; ++c) {
    acc_t v[4];
    Vec4<acc_t>::load(p + c * 4 * ln.G, v);
#pragma unroll
    for (int e = 0; e < 4; ++e) y[4 * c + e] += a * v[e];
  }
}

// Four adjacent values of a global row, moved as one load or store (8 bytes for half, 16 for float).
template <typename scalar_t>
struct alignas(4 * sizeof(scalar_t)) Pack4 {
  scalar_t v[4];
};

// Values d..d+3 of a global row as acc_t; vec4: one Pack4 load (d is a multiple of 4, and so is hd).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load4(const scalar_t* src, int32_t d, int32_t hd, bool vec4, acc_t* x) {
  if (vec4) {
    const Pack4<scalar_t> p4 = *reinterpret_cast<const Pack4<scalar_t>*>(src + d);
#pragma unroll
    for (int e = 0; e < 4; ++e) x[e] = static_cast<acc_t>(p4.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) x[e] = d + e < hd ? static_cast<acc_t>(src[d + e]) : acc_t(0);
  }
}

// This lane's part of a global row of hd values (zeros past hd, or everywhere when src is nullptr). The
// lane's values come in groups of four adjacent dims, so vec4 rows load one Pack4 per group.
template <int DPT, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_row(acc_t (&x)[DPT], const scalar_t* src, int32_t hd, bool vec4,
                                         const Lane& ln) {
#pragma unroll
  for (int c = 0; c < DPT / 4; ++c) {
    const int32_t d = ln.dim(4 * c);
    if (src != nullptr && d < hd) {
      load4(src, d, hd, vec4, &x[4 * c]);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) x[4 * c + e] = 0;
    }
  }
}

// dst[0, hd) = x * mul, this lane's part.
template <int DPT, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_row(scalar_t* dst, const acc_t (&x)[DPT], acc_t mul, int32_t hd, bool vec4,
                                          const Lane& ln) {
#pragma unroll
  for (int c = 0; c < DPT / 4; ++c) {
    const int32_t d = ln.dim(4 * c);
    if (d >= hd) continue;
    if (vec4) {
      Pack4<scalar_t> p4;
#pragma unroll
      for (int e = 0; e < 4; ++e) p4.v[e] = static_cast<scalar_t>(x[4 * c + e] * mul);
      *reinterpret_cast<Pack4<scalar_t>*>(dst + d) = p4;
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (d + e < hd) dst[d + e] = static_cast<scalar_t>(x[4 * c + e] * mul);
      }
    }
  }
}

// Fills two shared tiles of tile_rows x (1 << hd_shift) values from two row sources (src.row(r): the global
// row of tile row r, or nullptr for a row of zeros); zeros past hd. Each thread moves groups of four adjacent
// values (one Pack4 load each for vec4 rows), kBatch groups at a time so that several loads are in flight.
// window.cu's load_tiles calls it with sources (TileRows) that look the row up in its tile's pixel table.
template <typename scalar_t, typename acc_t, typename SrcA, typename SrcB>
__device__ __forceinline__ void load_tile_pair(int32_t tile_rows, int32_t hd_shift, int32_t hd, bool vec4,
                                               const SrcA& src_a, acc_t* tile_a, const SrcB& src_b, acc_t* tile_b) {
  constexpr int kBatch = 4;
  const int32_t group_shift = hd_shift - 2;  // groups of four per row: hd_pad / 4, a power of two
  const int32_t total = tile_rows << group_shift;
  const int32_t stride = static_cast<int32_t>(blockDim.x);
  for (int32_t e0 = threadIdx.x; e0 < total; e0 += kBatch * stride) {
    acc_t va[kBatch][4], vb[kBatch][4];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int32_t e = e0 + k * stride;
      const int32_t r = e >> group_shift, d = (e & ((1 << group_shift) - 1)) * 4;
      const scalar_t* a = nullptr;
      const scalar_t* b = nullptr;
      if (e < total && d < hd) a = src_a.row(r), b = src_b.row(r);
      if (a != nullptr) {
        load4(a, d, hd, vec4, va[k]);
      } else {
#pragma unroll
        for (int c = 0; c < 4; ++c) va[k][c] = 0;
      }
      if (b != nullptr) {
        load4(b, d, hd, vec4, vb[k]);
      } else {
#pragma unroll
        for (int c = 0; c < 4; ++c) vb[k][c] = 0;
      }
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int32_t e = e0 + k * stride;
      if (e < total) Vec4<acc_t>::store(tile_a + 4 * e, va[k]), Vec4<acc_t>::store(tile_b + 4 * e, vb[k]);
    }
  }
}

// Host: calls f(std::integral_constant<int, DPT>) for dpt (the kernel's slice width, 16 or 32); kWide: 32 is
// possible (so that double and the dk/dv kernels do not instantiate a width they never use).
template <bool kWide, typename F>
void with_slice_width(int dpt, F&& f) {
  if constexpr (kWide) {
    if (dpt == 32) return f(std::integral_constant<int, 32>{});
  }
  f(std::integral_constant<int, 16>{});
}

// The current device's SM count, which the launch plans size their grids by; read once per device (a
// plain attribute query, without ATen's CUDAContext.h and the cuBLAS/cuSPARSE headers it pulls in).
inline int64_t multiprocessor_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> counts[kMaxDevices] = {};
  const int device = c10::cuda::current_device();
  if (device >= kMaxDevices) {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
  }
  int count = counts[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    counts[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

}  // namespace attn
}  // namespace cuda
}  // namespace effvit
