// The CPU kernels' path overrides (LLAMA_FAST_CPU_GRAM, _EIG, _CHOL): which of two
// implementations to run, read from the environment on every call so tests can switch it.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace llama_fast {

enum class CpuPath { kAuto, kFirst, kSecond };

// Unset, empty or "auto" -> kAuto; `first` or `second` -> that path; anything else raises.
inline CpuPath cpu_path_from_env(const char* variable, const char* first, const char* second) {
  const char* env = std::getenv(variable);
  if (env == nullptr || *env == 0 || std::strcmp(env, "auto") == 0) return CpuPath::kAuto;
  if (std::strcmp(env, first) == 0) return CpuPath::kFirst;
  if (std::strcmp(env, second) == 0) return CpuPath::kSecond;
  TORCH_CHECK(false, variable, " must be auto, ", first, " or ", second, ", got '", env, "'");
}

}  // namespace llama_fast
