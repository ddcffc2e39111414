// Macros shared by the CPU and CUDA sources.
#pragma once

// A small function both the host and the device code call.
#if defined(__CUDACC__)
#define EFFVIT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define EFFVIT_HOST_DEVICE inline
#endif
