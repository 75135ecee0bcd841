// Python bindings of the CUDA sources in csrc/ (module sparse_attn._C).
#include <torch/extension.h>

void vertical_slash_index(torch::Tensor run_hi, torch::Tensor run_lo, torch::Tensor run_count,
                          torch::Tensor covered, torch::Tensor vert, torch::Tensor r_count, torch::Tensor r_start,
                          torch::Tensor r_end, torch::Tensor c_count, torch::Tensor c_idx, int64_t seqlen_q,
                          int64_t seqlen_k, int64_t block_q);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vertical_slash_index", &vertical_slash_index,
        "Vertical-slash sparse index: fill a VerticalSlashLayout's tensors from per-head tables (CUDA)");
}
