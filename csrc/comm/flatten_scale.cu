// Multi-tensor flatten-and-scale for the gradient buckets: dst[i] = src[i] * scale for many
// (src, dst) pairs in one kernel launch. Each thread block handles one fixed-size chunk of one
// tensor; the table that maps blocks to (tensor, chunk) travels in the kernel's arguments, so
// a launch needs no device-side metadata and no synchronisation.

#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "comm.h"

namespace hybridpar {
namespace comm {

namespace {

constexpr int kMaxTensors = 48;
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 16384;  // elements per block
constexpr int kThreads = 256;

struct TensorTable {
  const void* src[kMaxTensors];
  void* dst[kMaxTensors];
  int64_t numel[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
};

template <typename scalar_t, typename acc_t>
__global__ void flatten_scale_kernel(TensorTable table, acc_t scale) {
  const int t = table.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(table.numel[t], begin + kChunk);
  const scalar_t* src = static_cast<const scalar_t*>(table.src[t]);
  scalar_t* dst = static_cast<scalar_t*>(table.dst[t]);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    dst[i] = static_cast<scalar_t>(static_cast<acc_t>(src[i]) * scale);
  }
}

}  // namespace

void flatten_scale_cuda(const std::vector<at::Tensor>& src, const std::vector<at::Tensor>& dst, double scale) {
  const c10::cuda::CUDAGuard guard(dst.front().device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Sources are usually contiguous gradients; the few that are not are made so first.
  std::vector<at::Tensor> sources;
  for (const auto& s : src) sources.push_back(s.contiguous());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.front().scalar_type(), "flatten_scale", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TensorTable table;
    int tensors = 0, blocks = 0;
    auto launch = [&] {
      if (blocks > 0) {
        flatten_scale_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(table, static_cast<acc_t>(scale));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      tensors = 0;
      blocks = 0;
    };
    for (size_t i = 0; i < sources.size(); ++i) {
      const int64_t numel = sources[i].numel();
      if (numel == 0) continue;
      if (tensors == kMaxTensors) launch();
      table.src[tensors] = sources[i].data_ptr();
      table.dst[tensors] = dst[i].data_ptr();
      table.numel[tensors] = numel;
      const int64_t chunks = (numel + kChunk - 1) / kChunk;
      for (int64_t c = 0; c < chunks; ++c) {
        table.block_tensor[blocks] = static_cast<unsigned char>(tensors);
        table.block_chunk[blocks] = static_cast<int>(c);
        if (++blocks == kMaxBlocks) {
          // The table is full: run it, and carry the tensor over if it has chunks left.
          const bool more = c + 1 < chunks;
          const void* s = table.src[tensors];
          void* d = table.dst[tensors];
          launch();
          if (more) {
            table.src[0] = s;
            table.dst[0] = d;
            table.numel[0] = numel;
            tensors = 0;
          } else {
            tensors = -1;
          }
        }
      }
      tensors += 1;
    }
    launch();
  });
}

}  // namespace comm
}  // namespace hybridpar
