// How this build of hybridpar_ext._C was made. The CUDA half lives in
// cuda/cuda_info.cu because only nvcc knows the architectures it compiled for.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace hybridpar {

#ifdef HYBRIDPAR_WITH_CUDA
// Compute capabilities the device code was compiled for (80, 90, ...).
std::vector<int64_t> cuda_arch_list();
// CUDA toolkit version the sources were compiled with, e.g. "13.0".
std::string cuda_version();
// NCCL headers the build saw, e.g. "2.27.7"; empty when none were found.
std::string nccl_version();
#endif

}  // namespace hybridpar
