// Run-time choice of the CPU instruction set, so one binary runs on any x86-64 and uses AVX-512
// where the CPU has it.
//
// A hot loop is written once as an always-inline function template and compiled three times by
// EFFVIT_CPU_ISA_VARIANTS: with AVX-512 (x86-64-v4), with AVX2+FMA (x86-64-v3) and for the baseline.
// Only those three wrapper functions carry a `target` attribute; everything they call that is not
// inlined stays baseline code, so no AVX-512 instruction can leak into code another CPU runs (the
// hazard of compiling whole files with -mavx512f). cpu_isa() picks the variant once per process
// from CPUID; EFFVIT_CPU_ISA=avx2|default lowers it (for tests and for comparing the paths).
#pragma once

#include <cstdint>

namespace effvit {
namespace cpu {

enum class CpuIsa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

CpuIsa cpu_isa();                   // the variant in use
CpuIsa cpu_isa_supported();         // the best variant this CPU can run
const char* cpu_isa_name(CpuIsa isa);
const char* compiled_cpu_isas();    // e.g. "avx512 avx2 default"

}  // namespace cpu

// A GCC/Clang vector of kBytes bytes of T. Hot loops that keep vectors in registers across iterations (GEMM
// accumulators, reductions, selects) use the running variant's width — 64 bytes on AVX-512, 32 on AVX2, 16
// otherwise: a wider vector has no register mode in a narrower variant and lives on the stack.
template <int kBytes, typename T>
struct VecN {
  typedef T type __attribute__((vector_size(kBytes)));
  static constexpr int lanes = kBytes / sizeof(T);
};

}  // namespace effvit

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(EFFVIT_NO_CPU_ISA_DISPATCH)
#define EFFVIT_CPU_ISA_DISPATCH 1
#define EFFVIT_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512cd,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")))
#define EFFVIT_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")))
#else
#define EFFVIT_CPU_ISA_DISPATCH 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define EFFVIT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define EFFVIT_ALWAYS_INLINE inline
#endif

// Defines `name(args...)`, which runs `body(args...)` compiled for the CPU's best ISA. `body` must be
// EFFVIT_ALWAYS_INLINE so its loops are compiled (and auto-vectorised) inside each variant.
#if EFFVIT_CPU_ISA_DISPATCH
#define EFFVIT_CPU_ISA_VARIANTS(name, body)                                          \
  template <typename... Args>                                                        \
  EFFVIT_TARGET_AVX512 void name##_avx512(Args... args) { body(args...); }           \
  template <typename... Args>                                                        \
  EFFVIT_TARGET_AVX2 void name##_avx2(Args... args) { body(args...); }               \
  template <typename... Args>                                                        \
  void name##_default(Args... args) { body(args...); }                               \
  template <typename... Args>                                                        \
  void name(Args... args) {                                                          \
    switch (::effvit::cpu::cpu_isa()) {                                              \
      case ::effvit::cpu::CpuIsa::kAvx512: return name##_avx512<Args...>(args...);   \
      case ::effvit::cpu::CpuIsa::kAvx2: return name##_avx2<Args...>(args...);       \
      default: return name##_default<Args...>(args...);                              \
    }                                                                                \
  }
#else
#define EFFVIT_CPU_ISA_VARIANTS(name, body) \
  template <typename... Args>               \
  void name(Args... args) { body(args...); }
#endif
