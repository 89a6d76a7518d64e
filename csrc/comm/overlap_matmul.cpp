// all_gather_matmul and matmul_reduce_scatter: a GEMM whose input arrives by all-gather, or
// whose output leaves by reduce-scatter, split into chunks so that the collective of one
// chunk runs while the GEMM of another computes.
//
// Written once against c10d::ProcessGroup: on gloo the collectives run on gloo's threads
// while this thread multiplies; on NCCL they run on the process group's stream, which waits
// for the current stream with an event when a collective is issued, and Work::wait() makes
// the current stream wait for it in turn — no host synchronisation anywhere. Every buffer a
// collective reads or writes is held here until its work has been waited on.
//
// Layout: the split dimension is moved to the front and made contiguous, so that rank r's
// rows are one contiguous block and a chunk of them is a contiguous slice of that block.

#include <algorithm>
#include <functional>
#include <tuple>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "comm.h"

namespace hybridpar {
namespace comm {

namespace {

using WorkPtr = c10::intrusive_ptr<c10d::Work>;
using GroupPtr = c10::intrusive_ptr<c10d::ProcessGroup>;

// Row ranges [start, start + len) covering n rows in at most `chunks` nearly equal parts.
struct Chunks {
  std::vector<int64_t> start, len;
};

Chunks split_rows(int64_t n, int64_t chunks) {
  Chunks c;
  int64_t parts = std::max<int64_t>(1, std::min(chunks, n));
  for (int64_t j = 0, begin = 0; j < parts; ++j) {
    int64_t size = n / parts + (j < n % parts ? 1 : 0);
    c.start.push_back(begin);
    c.len.push_back(size);
    begin += size;
  }
  return c;
}

int64_t normalize_dim(const char* op, const char* arg, int64_t dim, const at::Tensor& x) {
  const int64_t ndim = x.dim();
  const int64_t normalized = dim < 0 ? dim + ndim : dim;
  TORCH_CHECK(normalized >= 0 && normalized < ndim - 1, op, ": ", arg, " must name a dimension of x other ",
              "than the last (the one the matmul contracts), i.e. in [", -ndim, ", ", ndim - 2,
              "] and not -1, for x of shape ", x.sizes(), ", got ", dim);
  return normalized;
}

void check_operands(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.is_floating_point(), op, ": x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, op, ": x must have at least 2 dimensions, got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(-1), op, ": weight must have shape [N, ",
              x.size(-1), "] to match the last dimension of x, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
              " but x has ", x.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(), " but x is on ", x.device());
}

// `t` with `dim` moved to the front, contiguous.
at::Tensor to_front(const at::Tensor& t, int64_t dim) {
  return t.movedim(dim, 0).contiguous();
}

std::vector<int64_t> with_front_and_last(const at::Tensor& t, int64_t front, int64_t last) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape.front() = front;
  shape.back() = last;
  return shape;
}

// Gathers `local` ([n, ...], contiguous) from every rank of `pg` into a new [world * n, ...]
// tensor, one all-gather per chunk of rows, all issued at once. Calls on_piece(rank, row,
// piece) for this rank's whole shard first — it is here already — and then for every other
// rank's piece of each chunk as that chunk arrives; `row` is the piece's first row in the
// gathered tensor.
using PieceFn = std::function<void(int64_t, int64_t, const at::Tensor&)>;

at::Tensor gather_in_chunks(const GroupPtr& pg, const at::Tensor& local, int64_t chunks, const PieceFn& on_piece) {
  const int64_t world = pg->getSize(), rank = pg->getRank(), n = local.size(0);
  std::vector<int64_t> shape(local.sizes().begin(), local.sizes().end());
  shape.front() = world * n;
  at::Tensor gathered = at::empty(shape, local.options());
  if (n == 0) return gathered;

  Chunks c = split_rows(n, chunks);
  std::vector<WorkPtr> works;
  std::vector<std::vector<at::Tensor>> outputs(c.start.size());
  std::vector<std::vector<at::Tensor>> inputs(c.start.size());
  for (size_t j = 0; j < c.start.size(); ++j) {
    for (int64_t r = 0; r < world; ++r) outputs[j].push_back(gathered.narrow(0, r * n + c.start[j], c.len[j]));
    inputs[j].push_back(local.narrow(0, c.start[j], c.len[j]));
    std::vector<std::vector<at::Tensor>> out_list{outputs[j]};
    works.push_back(pg->allgather(out_list, inputs[j]));
  }
  on_piece(rank, rank * n, local);
  for (size_t j = 0; j < works.size(); ++j) {
    works[j]->wait();
    for (int64_t r = 0; r < world; ++r) {
      if (r != rank) on_piece(r, r * n + c.start[j], outputs[j][r]);
    }
  }
  return gathered;
}

// rows @ b, written into out_rows (all three 2-D views of contiguous blocks).
void matmul_into(const at::Tensor& out_rows, const at::Tensor& rows, const at::Tensor& b) {
  at::mm_out(const_cast<at::Tensor&>(out_rows), rows, b);
}

at::Tensor as_rows(const at::Tensor& t) {
  return t.view({-1, t.size(-1)});
}

// reduce_scatter(x @ b) over `pg`, x being [world * n, ..., K] contiguous: the product is
// computed chunk by chunk and each chunk's reduce-scatter starts as soon as it is computed.
// wait() finishes it; until then `inputs` keeps every buffer a collective reads alive.
struct PendingReduceScatter {
  at::Tensor out;
  std::vector<WorkPtr> works;
  std::vector<at::Tensor> inputs;

  at::Tensor wait() {
    for (auto& work : works) work->wait();
    works.clear();
    inputs.clear();
    return out;
  }
};

PendingReduceScatter start_matmul_reduce_scatter(const GroupPtr& pg, const at::Tensor& x, const at::Tensor& b,
                                                 int64_t chunks) {
  const int64_t world = pg->getSize(), n = x.size(0) / world;
  PendingReduceScatter pending;
  pending.out = at::empty(with_front_and_last(x, n, b.size(1)), x.options());
  if (n == 0) return pending;

  Chunks c = split_rows(n, chunks);
  for (size_t j = 0; j < c.start.size(); ++j) {
    auto shape = with_front_and_last(x, c.len[j], b.size(1));
    shape.insert(shape.begin(), world);
    at::Tensor partial = at::empty(shape, x.options());
    std::vector<at::Tensor> pieces;
    for (int64_t r = 0; r < world; ++r) {
      matmul_into(as_rows(partial[r]), as_rows(x.narrow(0, r * n + c.start[j], c.len[j])), b);
      pieces.push_back(partial[r]);
    }
    std::vector<at::Tensor> out{pending.out.narrow(0, c.start[j], c.len[j])};
    std::vector<std::vector<at::Tensor>> in{pieces};
    pending.works.push_back(pg->reduce_scatter(out, in));
    pending.inputs.push_back(partial);
  }
  return pending;
}

}  // namespace

// all_gather(x, gather_dim) @ weight.T, and the gathered x.
std::tuple<at::Tensor, at::Tensor> all_gather_matmul(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::string& group_name, int64_t gather_dim,
                                                     int64_t chunks) {
  const char* op = "all_gather_matmul";
  check_operands(op, x, weight);
  gather_dim = normalize_dim(op, "gather_dim", gather_dim, x);
  TORCH_CHECK(chunks >= 1, op, ": chunks must be at least 1, got ", chunks);
  GroupPtr pg = resolve_group(op, group_name);

  at::Tensor local = to_front(x, gather_dim);
  at::Tensor b = weight.t();
  at::Tensor out = at::empty(with_front_and_last(local, pg->getSize() * local.size(0), weight.size(0)), x.options());
  at::Tensor gathered = gather_in_chunks(pg, local, chunks, [&](int64_t, int64_t row, const at::Tensor& piece) {
    matmul_into(as_rows(out.narrow(0, row, piece.size(0))), as_rows(piece), b);
  });
  return {out.movedim(0, gather_dim), gathered.movedim(0, gather_dim)};
}

// Backward of all_gather_matmul: grad_x = reduce_scatter(grad_out @ weight), built from the
// chunked matmul_reduce_scatter; grad_weight = grad_out^T @ gathered, computed while the
// reduce-scatters of grad_x are in flight.
std::tuple<at::Tensor, at::Tensor> all_gather_matmul_backward(const at::Tensor& grad_out, const at::Tensor& gathered,
                                                              const at::Tensor& weight,
                                                              const std::string& group_name,
                                                              int64_t gather_dim, int64_t chunks) {
  const char* op = "all_gather_matmul_backward";
  gather_dim = normalize_dim(op, "gather_dim", gather_dim, gathered);
  GroupPtr pg = resolve_group(op, group_name);
  at::Tensor dy = to_front(grad_out, gather_dim);
  at::Tensor full = to_front(gathered, gather_dim);
  PendingReduceScatter grad_x = start_matmul_reduce_scatter(pg, dy, weight, chunks);
  at::Tensor grad_weight = at::mm(as_rows(dy).t(), as_rows(full));
  return {grad_x.wait().movedim(0, gather_dim), grad_weight};
}

// reduce_scatter(x @ weight.T, scatter_dim).
at::Tensor matmul_reduce_scatter(const at::Tensor& x, const at::Tensor& weight, const std::string& group_name,
                                 int64_t scatter_dim, int64_t chunks) {
  const char* op = "matmul_reduce_scatter";
  check_operands(op, x, weight);
  scatter_dim = normalize_dim(op, "scatter_dim", scatter_dim, x);
  TORCH_CHECK(chunks >= 1, op, ": chunks must be at least 1, got ", chunks);
  GroupPtr pg = resolve_group(op, group_name);
  TORCH_CHECK(x.size(scatter_dim) % pg->getSize() == 0, op, ": x.shape[", scatter_dim, "] = ",
              x.size(scatter_dim), " cannot be split evenly over the ", pg->getSize(), " ranks of the group");
  return start_matmul_reduce_scatter(pg, to_front(x, scatter_dim), weight.t(), chunks).wait().movedim(0, scatter_dim);
}

// Backward of matmul_reduce_scatter: grad_x = all_gather(grad_out) @ weight, built from the
// chunked all_gather_matmul; grad_weight = all_gather(grad_out)^T @ x, accumulated piece by
// piece as the gathered chunks arrive (in float32 for half-precision inputs).
std::tuple<at::Tensor, at::Tensor> matmul_reduce_scatter_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                  const at::Tensor& weight,
                                                                  const std::string& group_name,
                                                                  int64_t scatter_dim, int64_t chunks) {
  const char* op = "matmul_reduce_scatter_backward";
  scatter_dim = normalize_dim(op, "scatter_dim", scatter_dim, x);
  GroupPtr pg = resolve_group(op, group_name);
  at::Tensor dy = to_front(grad_out, scatter_dim);
  at::Tensor xf = to_front(x, scatter_dim);
  at::Tensor grad_x = at::empty(with_front_and_last(xf, xf.size(0), weight.size(1)), x.options());
  const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options().dtype(half ? at::kFloat : x.scalar_type()));
  gather_in_chunks(pg, dy, chunks, [&](int64_t, int64_t row, const at::Tensor& piece) {
    at::Tensor dy_rows = as_rows(piece);
    at::Tensor x_rows = as_rows(xf.narrow(0, row, piece.size(0)));
    matmul_into(as_rows(grad_x.narrow(0, row, piece.size(0))), dy_rows, weight);
    if (half) {
      grad_weight.add_(at::mm(dy_rows.t(), x_rows).to(at::kFloat));
    } else {
      grad_weight.addmm_(dy_rows.t(), x_rows);
    }
  });
  return {grad_x.movedim(0, scatter_dim), grad_weight.to(x.scalar_type())};
}

}  // namespace comm
}  // namespace hybridpar

TORCH_LIBRARY_IMPL(hybridpar, CompositeExplicitAutograd, m) {
  m.impl("all_gather_matmul", &hybridpar::comm::all_gather_matmul);
  m.impl("all_gather_matmul_backward", &hybridpar::comm::all_gather_matmul_backward);
  m.impl("matmul_reduce_scatter", &hybridpar::comm::matmul_reduce_scatter);
  m.impl("matmul_reduce_scatter_backward", &hybridpar::comm::matmul_reduce_scatter_backward);
}
