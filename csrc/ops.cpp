// Entry point of hybridpar_ext._C: the Python module and its build report.

#include <torch/extension.h>

#include "build_info.h"

#ifndef HYBRIDPAR_TORCH_VERSION
#error "setup.py passes -DHYBRIDPAR_TORCH_VERSION=<the torch version built against>"
#endif

#define HYBRIDPAR_STR2(x) #x
#define HYBRIDPAR_STR(x) HYBRIDPAR_STR2(x)

namespace hybridpar {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = HYBRIDPAR_STR(HYBRIDPAR_TORCH_VERSION);
#ifdef HYBRIDPAR_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = cuda_version();
  info["cuda_arch_list"] = cuda_arch_list();
  std::string nccl = nccl_version();
  info["nccl_version"] = nccl.empty() ? pybind11::object(pybind11::none()) : pybind11::str(nccl);
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_arch_list"] = std::vector<int64_t>{};
  info["nccl_version"] = pybind11::none();
#endif
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#endif
  info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
  return info;
}

}  // namespace hybridpar

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hybridpar_ext compiled ops";
  m.def("build_info", &hybridpar::build_info,
        "How this extension was built: torch version, CUDA/NCCL versions, CUDA archs.");
}
