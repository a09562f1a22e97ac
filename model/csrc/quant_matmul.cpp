// y = x W^T (+ bias) with W kept in its GGUF block format (Q4_0, Q4_1, Q8_0: 32 weights per block, fp16
// scales), for the rows of a decode or verification step and short prefills. A decode step reads the packed bytes (Q4_1:
// 0.625 bytes a weight) instead of 4 bytes a weight, so the work per packed byte decides the speed. Paths, by the
// vector width of the CPU (`width`: AVX-512 where the build has it, else AVX2, else plain C++):
// - AVX-512, 1-32 rows: each block is dequantized in registers as two vectors of 16 (w = d q + m, exact in
//   float32) and used by up to 16 rows a pass; half the instructions a weight of the AVX2 path, so 2-4 rows cost
//   little more than 1 (a verification step of a few tokens is almost free next to a decode step); each thread
//   prefetches W 4 rows ahead of the row it computes;
// - AVX2, 1 row: per block y += d * sum(q * x) + m * sum(x): the nibbles become floats and meet x without a
//   per-weight scale; sum(x) per block is computed once per call and the m (Q4_0: -8 d) terms of a W row are
//   one dot product at its end (about 1.2x the in-register dequantization at one row; at 2-3 rows it is slower);
// - AVX2, 2-16 rows: each block is dequantized in registers (four vectors of 8) and used by up to 8 rows a pass;
// - above those: 48 W rows at a time are dequantized into a per-thread float32 tile that stays in cache, and x,
//   transposed once per call (K-major, rows padded to 8), passes it as outer products: per K step 6 weights
//   broadcast and 2 vectors of 8 rows of x feed 12 independent FMAs (8 rows of x against one W row at a time
//   were held back by their loads and FMA latency; no whole-matrix scratch);
// - the row counts the process's GEMM mask names (none until `set_quant_gemm_mask`, which
//   `model.quant_gemm_rows` sets from a measurement at load), and always above 64: each thread dequantizes 128
//   W rows at a time into a tile that stays in cache and multiplies it by x with ATen's GEMM. Which is faster
//   at a given row count depends on the CPU, hence a measurement rather than fixed bounds.
// Results differ from dequantize-then-matmul only in rounding and the order of summation. `quant_dequantize`
// writes the whole float32 matrix, for long prefills that go to one GEMM (`model.quant.PackedWeight.matmul`).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec8.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SPECSERVE_QUANT_AVX2 1
#endif

namespace {

// ggml_type ids of the formats handled here, and their block sizes in bytes (32 weights a block).
constexpr int kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8;
constexpr int64_t kBlock = 32;
constexpr int64_t kMaxRows = 64;  // the most rows the direct and tile paths take; more go to the GEMM path
constexpr int64_t kDirectRows = 16;  // above: the tile path (AVX-512: twice as many)
constexpr int64_t kTile = 64;  // W rows per parallel task of the direct path
constexpr int kTileW = 6;  // W rows a pass of the tile path (6 broadcasts a K step)
constexpr int64_t kTileRows = 8 * kTileW;  // W rows a tile of the tile path
constexpr int64_t kPrefetchRows = 4;  // the AVX-512 path asks for W this many rows ahead (1.2x at 1 row)
constexpr int64_t kGemmTileRows = 128;  // W rows a tile of the GEMM path (128 x K floats stay in L2)

std::atomic<uint64_t> g_gemm_mask{0};  // bit m - 1 set: m rows (1-64) go to the GEMM path (set_quant_gemm_mask)
std::atomic<int64_t> g_width{-1};  // the vector width a call with width -1 takes (set_quant_width; -1: the widest)

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

// Per row of x, per block b: terms[2b] = -8 sum(x of b) (Q4_0: m = -8 d), terms[2b+1] = sum(x of b) (Q4_1), so
// that with dm[2b] = d, dm[2b+1] = m (0 for Q4_0) a W row's offset terms are dot(dm, terms). Empty for Q8_0.
std::vector<float> block_terms(int64_t qtype, int64_t rows, const float* x, int64_t k_dim) {
  if (qtype == kQ8_0) return {};
  const int64_t nb = k_dim / kBlock;
  std::vector<float> t(rows * 2 * nb, 0.f);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      float s = 0.f;
      for (int i = 0; i < kBlock; ++i) s += x[m * k_dim + b * kBlock + i];
      t[m * 2 * nb + 2 * b + (qtype == kQ4_1)] = qtype == kQ4_1 ? s : -8.f * s;
    }
  return t;
}

inline float dot(const float* a, const float* b, int64_t n) {
  v8 acc{};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc += load8(a + i) * load8(b + i);
  float s = 0.f;
  for (int j = 0; j < 8; ++j) s += acc[j];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// The plain C++ path (machines without AVX2): the factored form of the 1-3 row kernel, any row count.
void rows_scalar(int64_t qtype, int64_t rows, const float* x, const float* terms, const uint8_t* wq,
                 const float* bias, float* y, int64_t k_dim, int64_t n_dim, int64_t begin, int64_t end) {
  const int64_t bb = block_bytes(qtype), nb = k_dim / kBlock;
  std::vector<float> dm(2 * nb);
  float q[kBlock];
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* row = wq + n * nb * bb;
    for (int64_t m = 0; m < rows; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * bb;
        dm[2 * b] = half_to_float(blk);
        dm[2 * b + 1] = qtype == kQ4_1 ? half_to_float(blk + 2) : 0.f;
        if (qtype == kQ8_0) {
          for (int i = 0; i < 32; ++i) q[i] = static_cast<float>(static_cast<int8_t>(blk[2 + i]));
        } else {
          const uint8_t* qs = blk + (qtype == kQ4_1 ? 4 : 2);
          for (int i = 0; i < 16; ++i) {
            q[i] = static_cast<float>(qs[i] & 0x0f);
            q[i + 16] = static_cast<float>(qs[i] >> 4);
          }
        }
        const float* xs = x + m * k_dim + b * kBlock;
        float s = 0.f;
        for (int i = 0; i < kBlock; ++i) s += q[i] * xs[i];
        acc += dm[2 * b] * s;
      }
      if (qtype != kQ8_0) acc += dot(dm.data(), terms + m * 2 * nb, 2 * nb);
      y[m * n_dim + n] = acc + (bias ? bias[n] : 0.f);
    }
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

// One block's quants as four vectors of 8 floats, unscaled (Q4_0 nibbles without the -8).
template <int Q>
inline void quants8x4(const uint8_t* b, __m256 q[4]) {
  if constexpr (Q == kQ8_0) {
    for (int j = 0; j < 4; ++j)
      q[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * j))));
  } else {
    // Bytes 0-7 and 8-15 widened to 32 bits straight from memory; a lane holds both nibbles of its byte
    // (weights i and i + 16), the high one needs no mask.
    const uint8_t* qs = b + (Q == kQ4_1 ? 4 : 2);
    const __m256i mask = _mm256_set1_epi32(0x0f);
    const __m256i r0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs)));
    const __m256i r1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8)));
    q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(r0, mask));
    q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(r1, mask));
    q[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(r0, 4));
    q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(r1, 4));
  }
}

// d and m of a block (converted together) into dm[0], dm[1] (m = 0 but for Q4_1), d returned broadcast.
template <int Q>
inline __m256 scales(const uint8_t* b, float* dm) {
  uint32_t h = 0;
  std::memcpy(&h, b, Q == kQ4_1 ? 4 : 2);
  _mm_storel_pi(reinterpret_cast<__m64*>(dm), _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(h))));
  return _mm256_broadcast_ss(dm);
}

// One block of M rows in the factored form: acc[m] += d * sum(q * x).
template <int Q, int M>
inline void block_factored(const uint8_t* blk, const float* xb, int64_t k_dim, float* dm, __m256 acc[M]) {
  const __m256 d = scales<Q>(blk, dm);
  __m256 q[4];
  quants8x4<Q>(blk, q);
  for (int m = 0; m < M; ++m) {
    const float* xm = xb + m * k_dim;
    __m256 p = _mm256_mul_ps(q[0], _mm256_loadu_ps(xm));
    p = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xm + 8), p);
    p = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xm + 16), p);
    p = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xm + 24), p);
    acc[m] = _mm256_fmadd_ps(d, p, acc[m]);
  }
}

// M rows (1 in use) in the factored form: the weights never get a per-weight scale; two accumulators a row (even
// and odd blocks).
template <int Q, int M>
void rows_factored(const float* x, const float* terms, const uint8_t* wq, const float* bias, float* y, int64_t k_dim,
                   int64_t n_dim, int64_t begin, int64_t end) {
  constexpr int64_t bb = Q == kQ4_0 ? 18 : (Q == kQ4_1 ? 20 : 34);
  const int64_t nb = k_dim / kBlock;
  std::vector<float> dm(2 * nb + 2);
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* row = wq + n * nb * bb;
    __m256 even[M], odd[M];
    for (int m = 0; m < M; ++m) even[m] = odd[m] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
      block_factored<Q, M>(row + b * bb, x + b * kBlock, k_dim, dm.data() + 2 * b, even);
      block_factored<Q, M>(row + (b + 1) * bb, x + (b + 1) * kBlock, k_dim, dm.data() + 2 * b + 2, odd);
    }
    if (b < nb) block_factored<Q, M>(row + b * bb, x + b * kBlock, k_dim, dm.data() + 2 * b, even);
    for (int m = 0; m < M; ++m) {
      float s = hsum(_mm256_add_ps(even[m], odd[m])) + (bias ? bias[n] : 0.f);
      if constexpr (Q != kQ8_0) s += dot(dm.data(), terms + m * 2 * nb, 2 * nb);
      y[m * n_dim + n] = s;
    }
  }
}

// M (2-8) rows: each block dequantized in registers once and used by all M rows. A block is 4 FMAs a row into
// A accumulators a row, M * A chains carried from block to block: about 8 keep both FMA units busy through the
// FMA's latency (with one accumulator a row, a 4-row verification step took about 20% longer); 6 and more rows
// have enough chains with one, and no registers to spare beside the 4 of w.
template <int Q, int M>
void rows_dequant(const float* x, const uint8_t* wq, const float* bias, float* y, int64_t k_dim, int64_t n_dim,
                  int64_t begin, int64_t end) {
  constexpr int A = M == 2 ? 4 : (M == 3 ? 3 : (M <= 5 ? 2 : 1));
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

// Calls f with std::integral_constant<int, M> for M = rows (1-Max): a row count chosen at run time picks its
// compiled kernel.
template <int Max, int M = 1, typename F>
inline void with_rows(int64_t rows, F&& f) {
  if constexpr (M <= Max) {
    if (rows == M) f(std::integral_constant<int, M>{});
    else with_rows<Max, M + 1>(rows, f);
  }
}

template <int Q>
void rows_avx2_any(int64_t rows, const float* x, const float* terms, const uint8_t* wq, const float* bias, float* y,
                   int64_t k_dim, int64_t n_dim, int64_t begin, int64_t end) {
  with_rows<8>(rows, [&](auto rows_c) {
    constexpr int M = decltype(rows_c)::value;
    if constexpr (M == 1) rows_factored<Q, 1>(x, terms, wq, bias, y, k_dim, n_dim, begin, end);
    else rows_dequant<Q, M>(x, wq, bias, y, k_dim, n_dim, begin, end);
  });
}

#endif

#if defined(SPECSERVE_QUANT_AVX2) && defined(__AVX512F__)
#define SPECSERVE_QUANT_AVX512 1

// One block's 32 weights as two vectors of 16: w = q * d + m (Q4_0: m = -8 d; Q8_0: m = 0). A Q4 block's 16
// bytes widen to 16 lanes in one step; a lane's low nibble is weight i, its high nibble weight i + 16.
template <int Q>
inline void dequant16x2(const uint8_t* b, __m512 w[2]) {
  float dm[2];
  const __m512 d = _mm512_broadcastss_ps(_mm256_castps256_ps128(scales<Q>(b, dm)));
  if constexpr (Q == kQ8_0) {
    for (int j = 0; j < 2; ++j)
      w[j] = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + 16 * j)))),
          d);
  } else {
    const __m512 m = Q == kQ4_1 ? _mm512_set1_ps(dm[1]) : _mm512_mul_ps(d, _mm512_set1_ps(-8.f));
    const __m512i r =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (Q == kQ4_1 ? 4 : 2))));
    w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(r, _mm512_set1_epi32(0x0f))), d, m);
    w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(r, 4)), d, m);
  }
}

// M (1-16) rows with 16-lane vectors: each block dequantized in registers once and used by all M rows, U blocks a
// pass and A accumulators a row so that M * A chains of FMAs (at least 8) cover the FMA's latency; the same
// arithmetic per weight as the AVX2 path in half the instructions, and twice the rows a pass (32 registers).
template <int Q, int M>
void rows_dequant512(const float* x, const uint8_t* wq, const float* bias, float* y, int64_t k_dim, int64_t n_dim,
                     int64_t begin, int64_t end) {
  constexpr int U = M == 1 ? 4 : (M <= 3 ? 2 : 1), A = M > 8 ? 1 : 2 * U;
  constexpr int64_t bb = Q == kQ4_0 ? 18 : (Q == kQ4_1 ? 20 : 34);
  const int64_t nb = k_dim / kBlock;
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* row = wq + n * nb * bb;
    if (n + kPrefetchRows < end)  // the hardware prefetcher alone left a row of W waiting on memory
      for (int64_t off = 0; off < nb * bb; off += 64) __builtin_prefetch(row + kPrefetchRows * nb * bb + off);
    __m512 acc[M][A];
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
    auto block = [&](int64_t b, int u) {  // block b into the accumulators of pass slot u (a constant once inlined)
      __m512 w[2];
      dequant16x2<Q>(row + b * bb, w);
      const float* xb = x + b * kBlock;
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < 2; ++j)
          acc[m][(2 * u + j) % A] =
              _mm512_fmadd_ps(_mm512_loadu_ps(xb + m * k_dim + 16 * j), w[j], acc[m][(2 * u + j) % A]);
    };
    int64_t b = 0;
    for (; b + U <= nb; b += U)
      for (int u = 0; u < U; ++u) block(b + u, u);
    for (; b < nb; ++b) block(b, 0);
    for (int m = 0; m < M; ++m) {
      __m512 s = acc[m][0];
      for (int a = 1; a < A; ++a) s = _mm512_add_ps(s, acc[m][a]);
      y[m * n_dim + n] = _mm512_reduce_add_ps(s) + (bias ? bias[n] : 0.f);
    }
  }
}

template <int Q>
void rows_avx512_any(int64_t rows, const float* x, const uint8_t* wq, const float* bias, float* y, int64_t k_dim,
                     int64_t n_dim, int64_t begin, int64_t end) {
  with_rows<16>(rows, [&](auto rows_c) {
    rows_dequant512<Q, decltype(rows_c)::value>(x, wq, bias, y, k_dim, n_dim, begin, end);
  });
}

#endif

#ifdef SPECSERVE_QUANT_AVX2
// Calls f with std::integral_constant<int, Q> for the block format qtype.
template <typename F>
inline void with_qtype(int64_t qtype, F&& f) {
  if (qtype == kQ4_0) f(std::integral_constant<int, kQ4_0>{});
  else if (qtype == kQ4_1) f(std::integral_constant<int, kQ4_1>{});
  else f(std::integral_constant<int, kQ8_0>{});
}

// `count` consecutive blocks of format Q to float32 with vectors of `width` (256 or 512) bits.
template <int Q>
void dequant_vector(const uint8_t* src, float* dst, int64_t count, int width) {
  constexpr int64_t bb = Q == kQ4_0 ? 18 : (Q == kQ4_1 ? 20 : 34);
  for (int64_t i = 0; i < count; ++i, src += bb, dst += kBlock) {
#ifdef SPECSERVE_QUANT_AVX512
    if (width == 512) {
      __m512 v[2];
      dequant16x2<Q>(src, v);
      _mm512_storeu_ps(dst, v[0]);
      _mm512_storeu_ps(dst + 16, v[1]);
      continue;
    }
#endif
    __m256 v[4];
    dequant8x4<Q>(src, v);
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(dst + 8 * j, v[j]);
  }
}
#endif

// `count` consecutive blocks to float32 (exactly the dequantized checkpoint's values) with vectors of `width` bits.
void dequant_blocks(int64_t qtype, const uint8_t* src, float* dst, int64_t count, int width) {
#ifdef SPECSERVE_QUANT_AVX2
  if (width > 0) {
    with_qtype(qtype, [&](auto q) { dequant_vector<decltype(q)::value>(src, dst, count, width); });
    return;
  }
#endif
  const int64_t bb = block_bytes(qtype);
  for (int64_t i = 0; i < count; ++i) dequant_block(qtype, src + i * bb, dst + i * kBlock);
}

// NW rows of W (row-major, a tile in cache) times V * 8 rows of x from its K-major copy xt ([K][mp]), as outer
// products: y[m][n] = bias[n] + sum over K of w[n][k] * x[m][k], for the first `rows` of the V * 8.
template <int V, int NW>
void tile_block(const float* w, const float* xt, int64_t mp, const float* bias, float* y, int64_t k_dim, int64_t n_dim,
                int64_t rows) {
  v8 acc[NW][V];
  for (int j = 0; j < NW; ++j)
    for (int v = 0; v < V; ++v) acc[j][v] = v8{};
  for (int64_t k = 0; k < k_dim; ++k) {
    v8 xv[V];
    for (int v = 0; v < V; ++v) xv[v] = load8(xt + k * mp + 8 * v);
    for (int j = 0; j < NW; ++j) {
      const v8 wb = v8{} + w[j * k_dim + k];
      for (int v = 0; v < V; ++v) acc[j][v] += wb * xv[v];
    }
  }
  for (int j = 0; j < NW; ++j) {
    const float b = bias ? bias[j] : 0.f;
    for (int64_t i = 0; i < rows; ++i) y[i * n_dim + j] = acc[j][i / 8][i % 8] + b;
  }
}

template <int V>
void tile_rows(const float* w, int64_t w_rows, const float* xt, int64_t mp, const float* bias, float* y,
               int64_t k_dim, int64_t n_dim, int64_t rows) {
  int64_t j = 0;
  for (; j + kTileW <= w_rows; j += kTileW)
    tile_block<V, kTileW>(w + j * k_dim, xt, mp, bias ? bias + j : nullptr, y + j, k_dim, n_dim, rows);
  for (; j < w_rows; ++j) tile_block<V, 1>(w + j * k_dim, xt, mp, bias ? bias + j : nullptr, y + j, k_dim, n_dim, rows);
}

// y = x W^T (+ bias) by tiles: each thread dequantizes kGemmTileRows W rows into a scratch tile and multiplies
// x by it with ATen's GEMM (single-threaded inside the parallel region). InferenceMode is per thread: the
// workers enter it themselves, and write y through its pointer.
at::Tensor gemm_tiles(const at::Tensor& x, const uint8_t* wp, int64_t qtype, int64_t n, const float* bias,
                      int width) {
  const int64_t m = x.size(0), k = x.size(1), row_bytes = k / kBlock * block_bytes(qtype);
  at::Tensor y = at::empty({m, n}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (n + kGemmTileRows - 1) / kGemmTileRows, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard;
    at::Tensor tile = at::empty({kGemmTileRows, k}, x.options());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t t0 = t * kGemmTileRows, rows = std::min(kGemmTileRows, n - t0);
      dequant_blocks(qtype, wp + t0 * row_bytes, tile.data_ptr<float>(), rows * (k / kBlock), width);
      const at::Tensor part = at::mm(x, tile.narrow(0, 0, rows).t());  // [m, rows], contiguous
      const float* pp = part.data_ptr<float>();
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < rows; ++j) yp[i * n + t0 + j] = pp[i * rows + j] + (bias ? bias[t0 + j] : 0.f);
    }
  });
  return y;
}

void check_weight(const at::Tensor& wq, int64_t qtype, int64_t n, int64_t k) {
  TORCH_CHECK(wq.device().is_cpu() && wq.scalar_type() == at::kByte && wq.is_contiguous(),
              "packed weight must be contiguous uint8 on CPU");
  TORCH_CHECK(k % kBlock == 0, "packed weight: in_features ", k, " is not a multiple of ", kBlock);
  TORCH_CHECK(wq.numel() == n * (k / kBlock) * block_bytes(qtype), "packed weight has ", wq.numel(),
              " bytes, not the size of a [", n, ", ", k, "] matrix of type ", qtype);
}

// The vector widths this build has (0 and the widest are the ends): checked on every call, so no allocation.
#if defined(SPECSERVE_QUANT_AVX512)
constexpr int64_t kWidest = 512;
#elif defined(SPECSERVE_QUANT_AVX2)
constexpr int64_t kWidest = 256;
#else
constexpr int64_t kWidest = 0;
#endif

bool has_width(int64_t bits) { return bits == 0 || (bits == 256 && kWidest >= 256) || (bits == 512 && kWidest == 512); }

}  // namespace

std::vector<int64_t> quant_matmul_widths() {
  std::vector<int64_t> widths{0};
  for (int64_t bits : {256, 512})
    if (has_width(bits)) widths.push_back(bits);
  return widths;
}

void set_quant_gemm_mask(uint64_t mask) { g_gemm_mask = mask; }

void set_quant_width(int64_t bits) {
  TORCH_CHECK(bits == -1 || has_width(bits), "quant_matmul: this build has no ", bits, "-bit path");
  g_width = bits;
}

int64_t quant_width() {
  const int64_t bits = g_width.load();
  return bits >= 0 ? bits : kWidest;
}

uint64_t quant_gemm_mask() { return g_gemm_mask; }

at::Tensor quant_matmul(const at::Tensor& x, const at::Tensor& wq, int64_t qtype, int64_t n,
                        const c10::optional<at::Tensor>& bias, int64_t width, int64_t direct_rows, int64_t gemm_rows) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2, "x must be float32 [M, K]");
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1);
  check_weight(wq, qtype, n, k);
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n && bias->is_contiguous(), "bad bias");
    b = bias->data_ptr<float>();
  }
  if (width < 0) width = quant_width();
  TORCH_CHECK(has_width(width), "quant_matmul: this build has no ", width, "-bit path");
  const uint8_t* wp = wq.data_ptr<uint8_t>();
  const bool listed = gemm_rows < 0 ? (g_gemm_mask.load() >> (m - 1) & 1) : m > gemm_rows;
  if (m > kMaxRows || (m > 0 && listed)) return gemm_tiles(xc, wp, qtype, n, b, static_cast<int>(width));
  at::Tensor y = at::empty({m, n}, xc.options());
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (m == 0) return y;
  const int64_t row_bytes = k / kBlock * block_bytes(qtype);
  if (m > (direct_rows >= 0 ? direct_rows : width == 512 ? 2 * kDirectRows : kDirectRows)) {  // the tile path
    const int64_t mp = (m + 7) / 8 * 8;
    std::vector<float> xt(k * mp, 0.f);  // x K-major, rows padded to a multiple of 8 with zeros
    at::parallel_for(0, k, 64, [&](int64_t begin, int64_t end) {
      for (int64_t kk = begin; kk < end; ++kk)
        for (int64_t i = 0; i < m; ++i) xt[kk * mp + i] = xp[i * k + kk];
    });
    at::parallel_for(0, (n + kTileRows - 1) / kTileRows, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> tile(kTileRows * k);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t t0 = t * kTileRows, w_rows = std::min(kTileRows, n - t0);
        dequant_blocks(qtype, wp + t0 * row_bytes, tile.data(), w_rows * (k / kBlock), width);
        for (int64_t m0 = 0; m0 < m; m0 += 16) {
          const int64_t rows = std::min<int64_t>(16, m - m0);
          const float* bt = b ? b + t0 : nullptr;
          float* yt = yp + m0 * n + t0;
          if (rows > 8) tile_rows<2>(tile.data(), w_rows, xt.data() + m0, mp, bt, yt, k, n, rows);
          else tile_rows<1>(tile.data(), w_rows, xt.data() + m0, mp, bt, yt, k, n, rows);
        }
      }
    });
    return y;
  }
  // the factored form's offset terms (the AVX-512 path dequantizes and needs none)
  const std::vector<float> terms = width == 512 ? std::vector<float>{} : block_terms(qtype, m, xp, k);
  const int64_t terms_row = terms.empty() ? 0 : 2 * (k / kBlock);
  at::parallel_for(0, n, kTile, [&](int64_t begin, int64_t end) {
    for (int64_t t0 = begin; t0 < end; t0 += kTile) {
      const int64_t t1 = std::min(end, t0 + kTile);
      if (width == 0) {
        rows_scalar(qtype, m, xp, terms.data(), wp, b, yp, k, n, t0, t1);
        continue;
      }
      const int64_t pass = width == 512 ? 16 : 8;  // rows a pass of the direct path
      for (int64_t m0 = 0; m0 < m; m0 += pass) {
        const int64_t rows = std::min<int64_t>(pass, m - m0);
        const float* xs = xp + m0 * k;
        const float* ts = terms.data() + m0 * terms_row;
        float* ys = yp + m0 * n;
#ifdef SPECSERVE_QUANT_AVX2
        with_qtype(qtype, [&](auto q) {
          constexpr int Q = decltype(q)::value;
#ifdef SPECSERVE_QUANT_AVX512
          if (width == 512) return rows_avx512_any<Q>(rows, xs, wp, b, ys, k, n, t0, t1);
#endif
          rows_avx2_any<Q>(rows, xs, ts, wp, b, ys, k, n, t0, t1);
        });
#else
        rows_scalar(qtype, rows, xs, ts, wp, b, ys, k, n, t0, t1);
#endif
      }
    }
  });
  return y;
}

at::Tensor quant_dequantize(const at::Tensor& wq, int64_t qtype, int64_t n, int64_t k) {
  check_weight(wq, qtype, n, k);
  at::Tensor w = at::empty({n, k}, at::TensorOptions().dtype(at::kFloat));
  const uint8_t* src = wq.data_ptr<uint8_t>();
  float* dst = w.data_ptr<float>();
  at::parallel_for(0, n * (k / kBlock), 256, [&](int64_t begin, int64_t end) {
    dequant_blocks(qtype, src + begin * block_bytes(qtype), dst + begin * kBlock, end - begin, false);
  });
  return w;
}
