#include <cuda_runtime_api.h>

#include "../build_info.h"

#ifdef HYBRIDPAR_WITH_NCCL
#include <nccl.h>
#endif

namespace hybridpar {

std::vector<int64_t> cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  // nvcc defines this in every compilation pass, host included: the -arch list as
  // 100 * major + 10 * minor (800, 900); reported as compute capabilities (80, 90).
  std::vector<int64_t> archs = {__CUDA_ARCH_LIST__};
  for (auto& arch : archs) arch /= 10;
  return archs;
#else
  return {};
#endif
}

std::string cuda_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
}

std::string nccl_version() {
#ifdef HYBRIDPAR_WITH_NCCL
  return std::to_string(NCCL_MAJOR) + "." + std::to_string(NCCL_MINOR) + "." +
         std::to_string(NCCL_PATCH);
#else
  return "";
#endif
}

}  // namespace hybridpar
