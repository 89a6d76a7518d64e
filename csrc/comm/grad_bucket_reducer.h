// GradBucketReducer: data-parallel gradient reduction that overlaps backward.
//
// Parameters are packed, in reverse order of registration (roughly the order in which
// backward produces their gradients), into flat buckets of about `bucket_cap_bytes`, one
// dtype and device per bucket. As each gradient becomes ready (mark_ready, called from a
// post-accumulate-grad hook), its bucket counts down; a full bucket is flattened (gradients
// copied and scaled into it in one multi-tensor step) and its all-reduce — or reduce-scatter,
// for a sharded optimizer — starts at once. Buckets start in index order on every rank, so
// the collectives match across ranks whatever order the gradients arrive in. finish() starts
// what backward left (parameters without a gradient this step contribute zeros, so a rank that
// skipped a parameter never hangs the others), waits, and leaves every param.grad as a view
// of its bucket: the next backward accumulates straight into the bucket, and nothing is
// copied back.
//
// Averaging: float32/float64 buckets are summed and then divided by the world size, which is
// exactly all_reduce(grad) / world. float16/bfloat16 buckets are divided by the world size
// before the sum (so the sum cannot overflow) and summed in their own dtype by the backend.

#pragma once

#include <mutex>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "comm.h"

namespace hybridpar {
namespace comm {

class GradBucketReducer {
 public:
  GradBucketReducer(std::vector<at::Tensor> params, const std::string& group_name, int64_t bucket_cap_bytes,
                    bool reduce_scatter);

  // The gradient of params[index] is final for this backward pass.
  void mark_ready(int64_t index);
  // Start every bucket not started yet, wait for all, average, and point the gradients at the
  // buckets. Leaves the reducer ready for the next step.
  void finish();

  int64_t num_buckets() const { return static_cast<int64_t>(buckets_.size()); }
  // Indices (into params) of the parameters of each bucket, in bucket order.
  std::vector<std::vector<int64_t>> bucket_indices() const;
  // Element offset of each parameter in its bucket, by parameter index.
  std::vector<int64_t> offsets() const { return offset_; }
  std::vector<int64_t> bucket_of() const { return bucket_of_; }
  // The flat buffer of each bucket (numel padded to a multiple of the world size).
  std::vector<at::Tensor> buffers() const;
  // reduce_scatter mode: this rank's reduced shard of each bucket, after finish().
  std::vector<at::Tensor> shards() const;
  // How many buckets had started before finish() was called in the last step.
  int64_t started_during_backward() const { return started_before_finish_; }

 private:
  struct Bucket {
    std::vector<int64_t> params;
    int64_t numel = 0;  // of the parameters, before padding
    at::Tensor buffer;
    at::Tensor shard;
    int64_t pending = 0;
    c10::intrusive_ptr<c10d::Work> work;
  };

  void start_ready_buckets();
  void start(Bucket& bucket);
  at::Tensor slot(int64_t index) const;
  bool averages_before_sum(const Bucket& bucket) const;

  std::vector<at::Tensor> params_;
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  bool reduce_scatter_;
  std::vector<Bucket> buckets_;
  std::vector<int64_t> bucket_of_, offset_;
  std::vector<bool> ready_;
  size_t next_to_start_ = 0;
  int64_t started_before_finish_ = 0;
  std::mutex mutex_;
};

}  // namespace comm
}  // namespace hybridpar
