#include "cpu_isa.h"

#include <cstdlib>
#include <cstring>

namespace effvit {
namespace cpu {

CpuIsa cpu_isa_supported() {
#if EFFVIT_CPU_ISA_DISPATCH
  static const CpuIsa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512cd"))
      return CpuIsa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
      return CpuIsa::kAvx2;
    return CpuIsa::kDefault;
  }();
  return best;
#else
  return CpuIsa::kDefault;
#endif
}

CpuIsa cpu_isa() {
  // EFFVIT_CPU_ISA can only lower the choice: asking for AVX-512 on a CPU without it must not crash.
  static const CpuIsa chosen = [] {
    const CpuIsa best = cpu_isa_supported();
    const char* env = std::getenv("EFFVIT_CPU_ISA");
    if (env == nullptr || *env == '\0') return best;
    CpuIsa asked = best;
    if (std::strcmp(env, "default") == 0) asked = CpuIsa::kDefault;
    else if (std::strcmp(env, "avx2") == 0) asked = CpuIsa::kAvx2;
    else if (std::strcmp(env, "avx512") == 0) asked = CpuIsa::kAvx512;
    return static_cast<int>(asked) < static_cast<int>(best) ? asked : best;
  }();
  return chosen;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "default";
  }
}

const char* compiled_cpu_isas() {
#if EFFVIT_CPU_ISA_DISPATCH
  return "avx512 avx2 default";
#else
  return "default";
#endif
}

}  // namespace cpu
}  // namespace effvit
