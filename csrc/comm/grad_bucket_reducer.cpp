#include "grad_bucket_reducer.h"

#include <map>
#include <tuple>

namespace hybridpar {
namespace comm {

GradBucketReducer::GradBucketReducer(std::vector<at::Tensor> params, const std::string& group_name,
                                     int64_t bucket_cap_bytes, bool reduce_scatter)
    : params_(std::move(params)),
      group_(resolve_group("GradBucketReducer", group_name)),
      reduce_scatter_(reduce_scatter) {
  TORCH_CHECK(bucket_cap_bytes > 0, "GradBucketReducer: bucket_cap_bytes must be positive, got ", bucket_cap_bytes);
  const int64_t n = static_cast<int64_t>(params_.size());
  bucket_of_.assign(n, -1);
  offset_.assign(n, 0);
  ready_.assign(n, false);

  // One open bucket per (dtype, device); a parameter that would overflow it closes it.
  std::map<std::tuple<int, int, int>, int64_t> open;  // -> bucket index
  for (int64_t i = n - 1; i >= 0; --i) {
    const at::Tensor& p = params_[i];
    TORCH_CHECK(p.is_floating_point(), "GradBucketReducer: params[", i, "] has dtype ", p.scalar_type(),
                "; only floating parameters have gradients to reduce");
    auto key = std::make_tuple(static_cast<int>(p.scalar_type()), static_cast<int>(p.device().type()),
                               static_cast<int>(p.device().index()));
    auto it = open.find(key);
    if (it == open.end() || (buckets_[it->second].numel > 0 &&
                             (buckets_[it->second].numel + p.numel()) * static_cast<int64_t>(p.element_size()) > bucket_cap_bytes)) {
      buckets_.emplace_back();
      it = open.insert_or_assign(key, static_cast<int64_t>(buckets_.size()) - 1).first;
    }
    Bucket& bucket = buckets_[it->second];
    bucket_of_[i] = it->second;
    offset_[i] = bucket.numel;
    bucket.params.push_back(i);
    bucket.numel += p.numel();
  }

  const int64_t world = group_->getSize(), rank = group_->getRank();
  for (Bucket& bucket : buckets_) {
    // Padded so that every rank's shard is the same size.
    const int64_t padded = (bucket.numel + world - 1) / world * world;
    bucket.buffer = at::zeros({padded}, params_[bucket.params.front()].options().requires_grad(false));
    bucket.shard = reduce_scatter_ ? at::zeros({padded / world}, bucket.buffer.options())
                                   : bucket.buffer.narrow(0, rank * (padded / world), padded / world);
    bucket.pending = static_cast<int64_t>(bucket.params.size());
  }
}

at::Tensor GradBucketReducer::slot(int64_t index) const {
  return buckets_[bucket_of_[index]].buffer.narrow(0, offset_[index], params_[index].numel());
}

bool GradBucketReducer::averages_before_sum(const Bucket& bucket) const {
  auto dtype = bucket.buffer.scalar_type();
  return dtype == at::kHalf || dtype == at::kBFloat16;
}

void GradBucketReducer::mark_ready(int64_t index) {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(index >= 0 && index < static_cast<int64_t>(params_.size()), "GradBucketReducer.mark_ready: index ",
              index, " is out of range for ", params_.size(), " parameters");
  if (ready_[index]) return;
  ready_[index] = true;
  buckets_[bucket_of_[index]].pending -= 1;
  start_ready_buckets();
}

void GradBucketReducer::start_ready_buckets() {
  while (next_to_start_ < buckets_.size() && buckets_[next_to_start_].pending == 0) {
    start(buckets_[next_to_start_++]);
  }
}

void GradBucketReducer::start(Bucket& bucket) {
  const double scale = averages_before_sum(bucket) ? 1.0 / group_->getSize() : 1.0;
  std::vector<at::Tensor> src, dst;
  for (int64_t i : bucket.params) {
    at::Tensor& grad = params_[i].mutable_grad();
    at::Tensor view = slot(i);
    if (!grad.defined()) {
      view.zero_();
    } else {
      TORCH_CHECK(grad.layout() == at::kStrided, "GradBucketReducer: params[", i, "] has a sparse gradient");
      const bool in_place = grad.data_ptr() == view.data_ptr() && grad.is_contiguous();
      if (!in_place || scale != 1.0) {
        src.push_back(grad);
        dst.push_back(view);
      }
    }
  }
  flatten_scale(src, dst, scale);
  // From here on the bucket holds the gradient: later backward passes accumulate into it.
  for (int64_t i : bucket.params) {
    at::Tensor& grad = params_[i].mutable_grad();
    at::Tensor view = slot(i).view(params_[i].sizes());
    if (!grad.defined() || grad.data_ptr() != view.data_ptr()) grad = view;
  }

  if (reduce_scatter_) {
    const int64_t world = group_->getSize();
    std::vector<at::Tensor> out{bucket.shard};
    std::vector<std::vector<at::Tensor>> in{bucket.buffer.view({world, -1}).unbind(0)};
    bucket.work = group_->reduce_scatter(out, in);
  } else {
    std::vector<at::Tensor> tensors{bucket.buffer};
    bucket.work = group_->allreduce(tensors);
  }
}

void GradBucketReducer::finish() {
  std::lock_guard<std::mutex> lock(mutex_);
  started_before_finish_ = static_cast<int64_t>(next_to_start_);
  for (size_t b = next_to_start_; b < buckets_.size(); ++b) start(buckets_[b]);
  next_to_start_ = buckets_.size();
  const int64_t world = group_->getSize();
  for (Bucket& bucket : buckets_) {
    bucket.work->wait();
    bucket.work.reset();
    if (!averages_before_sum(bucket)) {
      (reduce_scatter_ ? bucket.shard : bucket.buffer).div_(world);
    }
    bucket.pending = static_cast<int64_t>(bucket.params.size());
  }
  std::fill(ready_.begin(), ready_.end(), false);
  next_to_start_ = 0;
}

std::vector<std::vector<int64_t>> GradBucketReducer::bucket_indices() const {
  std::vector<std::vector<int64_t>> out;
  for (const Bucket& bucket : buckets_) out.push_back(bucket.params);
  return out;
}

std::vector<at::Tensor> GradBucketReducer::buffers() const {
  std::vector<at::Tensor> out;
  for (const Bucket& bucket : buckets_) out.push_back(bucket.buffer);
  return out;
}

std::vector<at::Tensor> GradBucketReducer::shards() const {
  std::vector<at::Tensor> out;
  for (const Bucket& bucket : buckets_) out.push_back(bucket.shard);
  return out;
}

}  // namespace comm
}  // namespace hybridpar
