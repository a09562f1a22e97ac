// The small element-wise steps of a decoder layer, each fused into one pass (float32). In a decode step of a
// 135M model these run on a few rows, and as chains of PyTorch ops (RMSNorm alone is mean, pow, add, rsqrt,
// mul, mul) their dispatch and thread start-up cost more than the arithmetic (`scripts/bench_kernels.py`
// times both ways).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>

namespace {

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, name, " takes float32 CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, " takes [rows, features] with contiguous features");
}

constexpr int64_t kGrain = 8;  // rows per thread task: a few rows run on the calling thread alone

}  // namespace

// x += delta (when given, in place: the residual stream), then returns x / rms(x) * weight.
at::Tensor rms_norm(at::Tensor& x, const c10::optional<at::Tensor>& delta, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm");
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(weight.numel() == n && weight.is_contiguous() && weight.scalar_type() == at::kFloat, "bad weight");
  const float* dp = nullptr;
  int64_t d_row = 0;
  if (delta.has_value()) {
    check_rows(*delta, "rms_norm");
    TORCH_CHECK(delta->sizes() == x.sizes(), "delta must have x's shape");
    dp = delta->data_ptr<float>();
    d_row = delta->stride(0);
  }
  at::Tensor out = at::empty({rows, n}, x.options());
  float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const int64_t x_row = x.stride(0);
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* xr = xp + r * x_row;
      if (dp) {
        const float* dr = dp + r * d_row;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) xr[i] += dr[i];
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < n; ++i) ss += xr[i] * xr[i];
      const float scale = 1.f / std::sqrt(ss / n + static_cast<float>(eps));
      float* o = op + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o[i] = xr[i] * scale * wp[i];
    }
  });
  return out;
}

// Rotary embedding in place, rotate-half convention: x [T, H, D] (heads of a row adjacent, D contiguous),
// cos / sin [T, D] for each row's position.
void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3, "rope_ takes float32 [T, H, D]");
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2), "rope_ needs a row's heads adjacent");
  const int64_t rows = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2;
  TORCH_CHECK(d % 2 == 0 && cos.sizes() == sin.sizes() && cos.size(0) == rows && cos.size(-1) == d, "bad cos/sin");
  const at::Tensor c = cos.reshape({rows, d}).contiguous(), s = sin.reshape({rows, d}).contiguous();
  float* xp = x.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const int64_t x_row = x.stride(0);
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* cr = cp + r * d;
      const float* sr = sp + r * d;
      for (int64_t h = 0; h < heads; ++h) {
        float* a = xp + r * x_row + h * d;
        float* b = a + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float lo = a[i], hi = b[i];
          a[i] = lo * cr[i] - hi * sr[i];
          b[i] = hi * cr[half + i] + lo * sr[half + i];
        }
      }
    }
  });
}

// The gated MLP's activation: [T, 2I] (gate | up) -> silu(gate) * up, [T, I].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "silu_mul");
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "silu_mul needs an even width");
  at::Tensor out = at::empty({rows, n}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t g_row = gate_up.stride(0);
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* g = gp + r * g_row;
      const float* u = g + n;
      float* o = op + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}
