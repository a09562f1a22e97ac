// M (1-8) rows of x times W rows [begin, end) of a float32 [N, K] matrix: each loaded vector of W serves the M
// rows while it is in registers (the float32 small-batch matmul).
#pragma once

#include <cstdint>

#include "vec8.h"

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

// Rows [0, m) of x (any count) times W rows [begin, end), in groups of 8 rows of x.
inline void rows_times_weight_any(int64_t m, const float* x, const float* w, const float* bias, float* y,
                                  int64_t k_dim, int64_t n_dim, int64_t begin, int64_t end) {
  for (int64_t m0 = 0; m0 < m; m0 += 8) {
    const float* xs = x + m0 * k_dim;
    float* ys = y + m0 * n_dim;
    switch (m - m0 < 8 ? m - m0 : 8) {
      case 1: rows_times_weight<1>(xs, w, bias, ys, k_dim, n_dim, begin, end); break;
      case 2: rows_times_weight<2>(xs, w, bias, ys, k_dim, n_dim, begin, end); break;
      case 3: rows_times_weight<3>(xs, w, bias, ys, k_dim, n_dim, begin, end); break;
      case 4: rows_times_weight<4>(xs, w, bias, ys, k_dim, n_dim, begin, end); break;
      case 5: rows_times_weight<5>(xs, w, bias, ys, k_dim, n_dim, begin, end); break;
      case 6: rows_times_weight<6>(xs, w, bias, ys, k_dim, n_dim, begin, end); break;
      case 7: rows_times_weight<7>(xs, w, bias, ys, k_dim, n_dim, begin, end); break;
      case 8: rows_times_weight<8>(xs, w, bias, ys, k_dim, n_dim, begin, end); break;
      default: break;
    }
  }
}
