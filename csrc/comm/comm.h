// Shared pieces of the communication ops: resolving a process group by name and the
// flatten-and-scale step of the gradient buckets.

#pragma once

#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace hybridpar {
namespace comm {

// The process group registered under `group_name` (ProcessGroup.group_name in Python),
// or an error that names the op and the group.
c10::intrusive_ptr<c10d::ProcessGroup> resolve_group(const char* op, const std::string& group_name);

// dst[i] = src[i] * scale for every pair; src[i] and dst[i] have one dtype, one device and
// the same number of elements, and dst[i] is contiguous. On CUDA it is one kernel launch per
// few dozen tensors on the current stream; on the CPU a loop.
void flatten_scale(const std::vector<at::Tensor>& src, const std::vector<at::Tensor>& dst, double scale);

#ifdef HYBRIDPAR_WITH_CUDA
void flatten_scale_cuda(const std::vector<at::Tensor>& src, const std::vector<at::Tensor>& dst, double scale);
#endif

}  // namespace comm
}  // namespace hybridpar
