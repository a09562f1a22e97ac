// y = x W^T (+ bias) for a few rows of x (decode, speculative verification): W is streamed from memory once
// and up to 8 rows of x use each loaded vector of W while it is in registers (more rows: groups of 8 over a
// tile of W rows that stays in cache). At 1-8 rows this reads the weights at close to memory bandwidth, where
// oneDNN's GEMM (tuned for larger batches) reaches about 2/3 of it; past about 24 rows oneDNN is as fast.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>

#include "rows_gemm.h"

constexpr int64_t kMaxRows = 16;
constexpr int64_t kTile = 64;  // W rows per tile: 64 x K floats stay in L2 while each group of 8 x rows passes

at::Tensor small_matmul(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "small_matmul runs on CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "small_matmul is float32");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "x [M, K] and weight [N, K]");
  TORCH_CHECK(x.size(0) <= kMaxRows, "small_matmul takes at most ", kMaxRows, " rows");
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1), n = weight.size(0);
  at::Tensor y = at::empty({m, n}, xc.options());
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n && bias->is_contiguous(), "bad bias");
    b = bias->data_ptr<float>();
  }
  const float* xp = xc.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, kTile, [&](int64_t begin, int64_t end) {
    for (int64_t t0 = begin; t0 < end; t0 += kTile) {
      rows_times_weight_any(m, xp, wp, b, yp, k, n, t0, std::min(end, t0 + kTile));
    }
  });
  return y;
}
