// y = x W^T (+ bias) with W kept in its GGUF block format (Q4_0, Q4_1, Q8_0: 32 weights per block, fp16
// scales), for a few rows of x (decode, speculative verification). Each block is dequantized in registers and
// used by up to 8 rows of x while it is there, with float32 accumulation, so a step reads the packed bytes
// (Q4_1: 0.625 bytes a weight) instead of 4 bytes a weight. Dequantization is exact: d*q (+ m) is the float32
// value of the dequantized checkpoint (q*d is exact in float32 for fp16 d and q of 8 bits, and one FMA rounds
// d*q + m once, as a multiply then an add does), so results differ from the float32 path only in the order of
// summation. `quant_dequantize` writes the whole float32 matrix, for prefill batches that go to a GEMM.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SPECSERVE_QUANT_AVX2 1
#endif

namespace {

// ggml_type ids of the formats handled here, and their block sizes in bytes (32 weights a block).
constexpr int kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8;
constexpr int64_t kBlock = 32;
constexpr int64_t kMaxRows = 16;
constexpr int64_t kTile = 64;  // W rows per parallel task

int64_t block_bytes(int64_t qtype) {
  switch (qtype) {
    case kQ4_0: return 18;
    case kQ4_1: return 20;
    case kQ8_0: return 34;
    default: TORCH_CHECK(false, "unsupported quantization type ", qtype);
  }
}

float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf, nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    uint32_t e = 113, m = mant;
    while (!(m & 0x400)) {
      m <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((m & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The 32 float32 weights of one block (the plain C++ path, and the reference of the vector path).
void dequant_block(int64_t qtype, const uint8_t* b, float* w) {
  const float d = half_to_float(b);
  if (qtype == kQ8_0) {
    for (int i = 0; i < 32; ++i) w[i] = static_cast<float>(static_cast<int8_t>(b[2 + i])) * d;
    return;
  }
  const bool q41 = qtype == kQ4_1;
  const float m = q41 ? half_to_float(b + 2) : -8.f * d;
  const uint8_t* qs = b + (q41 ? 4 : 2);
  for (int i = 0; i < 16; ++i) {
    w[i] = static_cast<float>(qs[i] & 0x0f) * d + m;
    w[i + 16] = static_cast<float>(qs[i] >> 4) * d + m;
  }
}

void rows_scalar(int64_t qtype, int64_t rows, const float* x, const uint8_t* wq, const float* bias, float* y,
                 int64_t k_dim, int64_t n_dim, int64_t begin, int64_t end) {
  const int64_t bb = block_bytes(qtype), nb = k_dim / kBlock;
  float w[kBlock];
  float acc[kMaxRows];
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* row = wq + n * nb * bb;
    for (int64_t m = 0; m < rows; ++m) acc[m] = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      dequant_block(qtype, row + b * bb, w);
      for (int64_t m = 0; m < rows; ++m) {
        const float* xs = x + m * k_dim + b * kBlock;
        float s = 0.f;
        for (int i = 0; i < kBlock; ++i) s += xs[i] * w[i];
        acc[m] += s;
      }
    }
    for (int64_t m = 0; m < rows; ++m) y[m * n_dim + n] = acc[m] + (bias ? bias[n] : 0.f);
  }
}

#ifdef SPECSERVE_QUANT_AVX2

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// One block's 32 weights as four vectors of 8: w = q * d + m (Q4_0: m = -8 d; Q8_0: m = 0).
template <int Q>
inline void dequant8x4(const uint8_t* b, __m256 w[4]) {
  const __m256 d = _mm256_set1_ps(f16(b));
  if constexpr (Q == kQ8_0) {
    const uint8_t* qs = b + 2;
    for (int j = 0; j < 4; ++j) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * j));
      w[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
    }
  } else {
    const __m256 m = Q == kQ4_1 ? _mm256_set1_ps(f16(b + 2)) : _mm256_mul_ps(d, _mm256_set1_ps(-8.f));
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (Q == kQ4_1 ? 4 : 2)));
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int j = 0; j < 4; ++j) w[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j])), d, m);
  }
}

// M rows of x against W rows [begin, end). A accumulators per row break the FMA dependency chain when few rows
// share each block (at one row, four independent chains).
template <int Q, int M>
void rows_avx2(const float* x, const uint8_t* wq, const float* bias, float* y, int64_t k_dim, int64_t n_dim,
               int64_t begin, int64_t end) {
  constexpr int A = M == 1 ? 4 : (M <= 3 ? 2 : 1);
  constexpr int64_t bb = Q == kQ4_0 ? 18 : (Q == kQ4_1 ? 20 : 34);
  const int64_t nb = k_dim / kBlock;
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* row = wq + n * nb * bb;
    __m256 acc[M][A];
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m256 w[4];
      dequant8x4<Q>(row + b * bb, w);
      const float* xb = x + b * kBlock;
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < 4; ++j)
          acc[m][j % A] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + m * k_dim + 8 * j), w[j], acc[m][j % A]);
    }
    for (int m = 0; m < M; ++m) {
      __m256 s = acc[m][0];
      for (int a = 1; a < A; ++a) s = _mm256_add_ps(s, acc[m][a]);
      y[m * n_dim + n] = hsum(s) + (bias ? bias[n] : 0.f);
    }
  }
}

template <int Q>
void rows_avx2_any(int64_t rows, const float* x, const uint8_t* wq, const float* bias, float* y, int64_t k_dim,
                   int64_t n_dim, int64_t begin, int64_t end) {
  switch (rows) {
    case 1: rows_avx2<Q, 1>(x, wq, bias, y, k_dim, n_dim, begin, end); break;
    case 2: rows_avx2<Q, 2>(x, wq, bias, y, k_dim, n_dim, begin, end); break;
    case 3: rows_avx2<Q, 3>(x, wq, bias, y, k_dim, n_dim, begin, end); break;
    case 4: rows_avx2<Q, 4>(x, wq, bias, y, k_dim, n_dim, begin, end); break;
    case 5: rows_avx2<Q, 5>(x, wq, bias, y, k_dim, n_dim, begin, end); break;
    case 6: rows_avx2<Q, 6>(x, wq, bias, y, k_dim, n_dim, begin, end); break;
    case 7: rows_avx2<Q, 7>(x, wq, bias, y, k_dim, n_dim, begin, end); break;
    case 8: rows_avx2<Q, 8>(x, wq, bias, y, k_dim, n_dim, begin, end); break;
    default: break;
  }
}

#endif

void check_weight(const at::Tensor& wq, int64_t qtype, int64_t n, int64_t k) {
  TORCH_CHECK(wq.device().is_cpu() && wq.scalar_type() == at::kByte && wq.is_contiguous(),
              "packed weight must be contiguous uint8 on CPU");
  TORCH_CHECK(k % kBlock == 0, "packed weight: in_features ", k, " is not a multiple of ", kBlock);
  TORCH_CHECK(wq.numel() == n * (k / kBlock) * block_bytes(qtype), "packed weight has ", wq.numel(),
              " bytes, not the size of a [", n, ", ", k, "] matrix of type ", qtype);
}

}  // namespace

bool quant_matmul_vectorized() {
#ifdef SPECSERVE_QUANT_AVX2
  return true;
#else
  return false;
#endif
}

at::Tensor quant_matmul(const at::Tensor& x, const at::Tensor& wq, int64_t qtype, int64_t n,
                        const c10::optional<at::Tensor>& bias, bool scalar) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2, "x must be float32 [M, K]");
  TORCH_CHECK(x.size(0) <= kMaxRows, "quant_matmul takes at most ", kMaxRows, " rows");
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1);
  check_weight(wq, qtype, n, k);
  at::Tensor y = at::empty({m, n}, xc.options());
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n && bias->is_contiguous(), "bad bias");
    b = bias->data_ptr<float>();
  }
  const float* xp = xc.data_ptr<float>();
  const uint8_t* wp = wq.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  if (m == 0) return y;
  at::parallel_for(0, n, kTile, [&](int64_t begin, int64_t end) {
    for (int64_t t0 = begin; t0 < end; t0 += kTile) {
      const int64_t t1 = std::min(end, t0 + kTile);
      for (int64_t m0 = 0; m0 < m; m0 += 8) {
        const int64_t rows = std::min<int64_t>(8, m - m0);
        const float* xs = xp + m0 * k;
        float* ys = yp + m0 * n;
#ifdef SPECSERVE_QUANT_AVX2
        if (!scalar) {
          if (qtype == kQ4_0) rows_avx2_any<kQ4_0>(rows, xs, wp, b, ys, k, n, t0, t1);
          else if (qtype == kQ4_1) rows_avx2_any<kQ4_1>(rows, xs, wp, b, ys, k, n, t0, t1);
          else rows_avx2_any<kQ8_0>(rows, xs, wp, b, ys, k, n, t0, t1);
          continue;
        }
#endif
        rows_scalar(qtype, rows, xs, wp, b, ys, k, n, t0, t1);
      }
    }
  });
  return y;
}

at::Tensor quant_dequantize(const at::Tensor& wq, int64_t qtype, int64_t n, int64_t k) {
  check_weight(wq, qtype, n, k);
  at::Tensor w = at::empty({n, k}, at::TensorOptions().dtype(at::kFloat));
  const int64_t bb = block_bytes(qtype), nb = k / kBlock;
  const uint8_t* src = wq.data_ptr<uint8_t>();
  float* dst = w.data_ptr<float>();
  at::parallel_for(0, n * nb, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
#ifdef SPECSERVE_QUANT_AVX2
      __m256 v[4];
      if (qtype == kQ4_0) dequant8x4<kQ4_0>(src + i * bb, v);
      else if (qtype == kQ4_1) dequant8x4<kQ4_1>(src + i * bb, v);
      else dequant8x4<kQ8_0>(src + i * bb, v);
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(dst + i * kBlock + 8 * j, v[j]);
#else
      dequant_block(qtype, src + i * bb, dst + i * kBlock);
#endif
    }
  });
  return w;
}
