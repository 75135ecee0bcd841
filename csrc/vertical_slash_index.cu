// Vertical-slash sparse index, per (query block, batch x head): the CUDA twin of the Triton
// `_index_kernel` in sparse_attn/ops/vertical_slash/index.py. Both read the same per-head tables
// (runs of merged diagonals for full and last blocks, per-width tables of covered diagonals, sorted
// verticals) and write the same VerticalSlashLayout entries, so their outputs are identical.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__global__ void __launch_bounds__(kThreads) vertical_slash_index_kernel(
    const int* __restrict__ run_hi, const int* __restrict__ run_lo, const int* __restrict__ run_count,
    const uint8_t* __restrict__ covered, const int* __restrict__ vert, int* __restrict__ r_count,
    int* __restrict__ r_start, int* __restrict__ r_end, int* __restrict__ c_count, int* __restrict__ c_idx,
    int bh_total, int num_slash, int num_vert, int nqb, int max_ranges, int max_columns, int seqlen_q,
    int seqlen_k, int block_q) {
  const int qb = blockIdx.x;
  const int bh = blockIdx.y;
  const int off = seqlen_k - seqlen_q;
  const int q0 = qb * block_q;
  const int q1 = min(q0 + block_q, seqlen_q);
  const int width = q1 - q0;
  const int cls = qb == nqb - 1;  // full blocks share class 0; the last block has its own runs
  const int64_t table = static_cast<int64_t>(cls * bh_total + bh) * num_slash;
  const int n_runs = run_count[cls * bh_total + bh];
  const int64_t out_block = static_cast<int64_t>(bh) * nqb + qb;

  // Leading runs that end at or before key 0 are dropped; the rest are shifted by q0 + off.
  const int limit = q1 + off;
  int dead = 0;
  for (int g0 = 0; g0 < n_runs; g0 += kThreads) {
    const int g = g0 + threadIdx.x;
    dead += __syncthreads_count(g < n_runs && run_lo[table + g] >= limit);
  }
  for (int g = dead + threadIdx.x; g < n_runs; g += kThreads) {
    const int64_t dst = out_block * max_ranges + (g - dead);
    r_start[dst] = max(q0 + off - run_hi[table + g], 0);
    r_end[dst] = limit - run_lo[table + g];
  }
  if (threadIdx.x == 0) r_count[out_block] = n_runs - dead;

  // Columns: seen by some row, in no range, first of their repeats. Sorted, so the columns that some
  // row sees come first: stop at the first chunk that starts past the block's last row.
  // Kept ones are compacted in order: ballot within a warp, per-warp totals across the block.
  __shared__ int warp_kept[kWarps];
  const uint8_t* covered_h = covered + static_cast<int64_t>(cls * bh_total + bh) * (seqlen_k + block_q) + block_q - 1;
  const int* vert_h = vert + static_cast<int64_t>(bh) * num_vert;
  const int last_key = q1 - 1 + off;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int kept = 0;
  for (int c0 = 0; c0 < num_vert && vert_h[c0] <= last_key; c0 += kThreads) {
    const int c = c0 + threadIdx.x;
    bool keep = false;
    int j = 0;
    if (c < num_vert) {
      j = vert_h[c];
      const int prev = c > 0 ? vert_h[c - 1] : -1;
      keep = j <= last_key && j != prev && covered_h[q0 + off - j] == 0;
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) warp_kept[warp] = __popc(ballot);
    __syncthreads();
    int before = kept;
    int total = 0;
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? warp_kept[w] : 0;
      total += warp_kept[w];
    }
    if (keep) c_idx[out_block * max_columns + before + __popc(ballot & ((1u << lane) - 1u))] = j;
    kept += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) c_count[out_block] = kept;
}

void check_int32(const char* name, const torch::Tensor& t, const torch::Device& device) {
  TORCH_CHECK(t.device() == device, name, ": expected a tensor on ", device, ", got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == torch::kInt32, name, ": expected dtype int32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

}  // namespace

// Fills the five layout tensors (range counts / starts / ends, column counts / indices) in place.
void vertical_slash_index(torch::Tensor run_hi, torch::Tensor run_lo, torch::Tensor run_count,
                          torch::Tensor covered, torch::Tensor vert, torch::Tensor r_count, torch::Tensor r_start,
                          torch::Tensor r_end, torch::Tensor c_count, torch::Tensor c_idx, int64_t seqlen_q,
                          int64_t seqlen_k, int64_t block_q) {
  TORCH_CHECK(vert.is_cuda(), "vertical_slash_index: expected CUDA tensors");
  const torch::Device device = vert.device();
  const char* names[] = {"run_hi", "run_lo", "run_count", "verticals",
                         "range_counts", "range_starts", "range_ends", "column_counts", "column_indices"};
  const torch::Tensor* all[] = {&run_hi, &run_lo, &run_count, &vert, &r_count, &r_start, &r_end, &c_count, &c_idx};
  for (int i = 0; i < 9; ++i) check_int32(names[i], *all[i], device);
  TORCH_CHECK(covered.device() == device && covered.scalar_type() == torch::kUInt8 && covered.is_contiguous(),
              "covered: expected a contiguous uint8 tensor on ", device);
  TORCH_CHECK(vert.dim() == 3 && run_hi.dim() == 4 && r_start.dim() == 4 && c_idx.dim() == 4,
              "vertical_slash_index: unexpected tensor ranks");
  const int bh_total = static_cast<int>(vert.size(0) * vert.size(1));
  const int nqb = static_cast<int>(r_count.size(2));
  TORCH_CHECK(covered.dim() == 4 && covered.size(3) == seqlen_k + block_q,
              "covered: expected [2, B, H, seqlen_k + block_size_q]");
  if (bh_total == 0 || nqb == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  const dim3 grid(nqb, bh_total);
  vertical_slash_index_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      run_hi.data_ptr<int>(), run_lo.data_ptr<int>(), run_count.data_ptr<int>(), covered.data_ptr<uint8_t>(),
      vert.data_ptr<int>(), r_count.data_ptr<int>(), r_start.data_ptr<int>(), r_end.data_ptr<int>(),
      c_count.data_ptr<int>(), c_idx.data_ptr<int>(), bh_total, static_cast<int>(run_hi.size(3)),
      static_cast<int>(vert.size(2)), nqb, static_cast<int>(r_start.size(3)), static_cast<int>(c_idx.size(3)),
      static_cast<int>(seqlen_q), static_cast<int>(seqlen_k), static_cast<int>(block_q));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
