// Entry point of hybridpar_ext._C: the schemas of the compiled ops, the Python module, its
// build report and the gradient-bucket reducer's binding.

#include <torch/extension.h>
#include <torch/library.h>

#include "build_info.h"
#include "comm/grad_bucket_reducer.h"

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

// The Python custom ops (norms, attention) add to this namespace as fragments once _C is
// loaded. The comm ops' implementations are in comm/overlap_matmul.cpp; their fake
// implementations and autograd are registered from Python (hybridpar_ext/ops/comm.py).
TORCH_LIBRARY(hybridpar, m) {
  m.def("all_gather_matmul(Tensor x, Tensor weight, str group_name, int gather_dim=0, int chunks=1) "
        "-> (Tensor, Tensor)");
  m.def("all_gather_matmul_backward(Tensor grad_out, Tensor gathered, Tensor weight, str group_name, "
        "int gather_dim, int chunks) -> (Tensor, Tensor)");
  m.def("matmul_reduce_scatter(Tensor x, Tensor weight, str group_name, int scatter_dim=0, int chunks=1) "
        "-> Tensor");
  m.def("matmul_reduce_scatter_backward(Tensor grad_out, Tensor x, Tensor weight, str group_name, "
        "int scatter_dim, int chunks) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using hybridpar::comm::GradBucketReducer;
  namespace py = pybind11;
  m.doc() = "hybridpar_ext compiled ops";
  m.def("build_info", &hybridpar::build_info,
        "How this extension was built: torch version, CUDA/NCCL versions, CUDA archs.");

  py::class_<GradBucketReducer>(m, "GradBucketReducer")
      .def(py::init<std::vector<at::Tensor>, const std::string&, int64_t, bool>(), py::arg("params"),
           py::arg("group_name"), py::arg("bucket_cap_bytes"), py::arg("reduce_scatter"))
      .def("mark_ready", &GradBucketReducer::mark_ready, py::arg("index"),
           py::call_guard<py::gil_scoped_release>())
      .def("finish", &GradBucketReducer::finish, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_buckets", &GradBucketReducer::num_buckets)
      .def_property_readonly("bucket_indices", &GradBucketReducer::bucket_indices)
      .def_property_readonly("offsets", &GradBucketReducer::offsets)
      .def_property_readonly("bucket_of", &GradBucketReducer::bucket_of)
      .def_property_readonly("buffers", &GradBucketReducer::buffers)
      .def_property_readonly("shards", &GradBucketReducer::shards)
      .def_property_readonly("started_during_backward", &GradBucketReducer::started_during_backward);
}
