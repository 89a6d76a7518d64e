// Process groups by name, and the CPU side of the gradient buckets' flatten-and-scale.

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include "comm.h"

namespace hybridpar {
namespace comm {

c10::intrusive_ptr<c10d::ProcessGroup> resolve_group(const char* op, const std::string& group_name) {
  try {
    return c10d::resolve_process_group(group_name);
  } catch (const c10::Error&) {
    TORCH_CHECK(false, op, ": group '", group_name, "' is not a registered process group; pass ",
                "ProcessGroup.group_name of a group made by torch.distributed (init_process_group, new_group)");
  }
}

void flatten_scale(const std::vector<at::Tensor>& src, const std::vector<at::Tensor>& dst, double scale) {
  TORCH_CHECK(src.size() == dst.size(), "flatten_scale: ", src.size(), " sources but ", dst.size(), " destinations");
  if (src.empty()) return;
  for (size_t i = 0; i < src.size(); ++i) {
    TORCH_CHECK(src[i].numel() == dst[i].numel() && src[i].scalar_type() == dst[i].scalar_type() &&
                    src[i].device() == dst[i].device() && dst[i].is_contiguous(),
                "flatten_scale: pair ", i, " differs in size, dtype or device, or its destination is not contiguous");
  }
#ifdef HYBRIDPAR_WITH_CUDA
  if (dst.front().is_cuda()) {
    flatten_scale_cuda(src, dst, scale);
    return;
  }
#endif
  for (size_t i = 0; i < src.size(); ++i) {
    at::Tensor out = dst[i].view(src[i].sizes());
    if (scale == 1.0) {
      if (out.data_ptr() != src[i].data_ptr() || !src[i].is_contiguous()) out.copy_(src[i]);
    } else {
      at::mul_out(out, src[i], scale);
    }
  }
}

}  // namespace comm
}  // namespace hybridpar
