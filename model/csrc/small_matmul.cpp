// y = x W^T (+ bias) for a few rows of x (decode, speculative verification): W is streamed from memory once
// and up to 8 rows of x use each loaded vector of W while it is in registers (more rows: groups of 8 over a
// tile of W rows that stays in cache). At 1-8 rows this reads the weights at close to memory bandwidth, where
// oneDNN's GEMM (tuned for larger batches) reaches about 2/3 of it; past about 24 rows oneDNN is as fast.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>

#include "vec8.h"

namespace {

template <int M>
void rows_times_weight(const float* x, const float* w, const float* bias, float* y, int64_t k_dim, int64_t n_dim,
                       int64_t begin, int64_t end) {
  const int64_t k8 = k_dim / 8 * 8;
  for (int64_t n = begin; n < end; ++n) {
    const float* wr = w + n * k_dim;
    v8 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = v8{};
    for (int64_t k = 0; k < k8; k += 8) {
      const v8 wv = load8(wr + k);
      for (int m = 0; m < M; ++m) acc[m] += load8(x + m * k_dim + k) * wv;
    }
    for (int m = 0; m < M; ++m) {
      float s = bias ? bias[n] : 0.f;
      for (int i = 0; i < 8; ++i) s += acc[m][i];
      for (int64_t k = k8; k < k_dim; ++k) s += x[m * k_dim + k] * wr[k];
      y[m * n_dim + n] = s;
    }
  }
}

}  // namespace

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
      const int64_t t1 = std::min(end, t0 + kTile);
      for (int64_t m0 = 0; m0 < m; m0 += 8) {
        const float* xs = xp + m0 * k;
        float* ys = yp + m0 * n;
        switch (std::min<int64_t>(8, m - m0)) {
          case 1: rows_times_weight<1>(xs, wp, b, ys, k, n, t0, t1); break;
          case 2: rows_times_weight<2>(xs, wp, b, ys, k, n, t0, t1); break;
          case 3: rows_times_weight<3>(xs, wp, b, ys, k, n, t0, t1); break;
          case 4: rows_times_weight<4>(xs, wp, b, ys, k, n, t0, t1); break;
          case 5: rows_times_weight<5>(xs, wp, b, ys, k, n, t0, t1); break;
          case 6: rows_times_weight<6>(xs, wp, b, ys, k, n, t0, t1); break;
          case 7: rows_times_weight<7>(xs, wp, b, ys, k, n, t0, t1); break;
          case 8: rows_times_weight<8>(xs, wp, b, ys, k, n, t0, t1); break;
          default: break;
        }
      }
    }
  });
  return y;
}
