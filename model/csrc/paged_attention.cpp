// Paged attention on CPU for decode, speculative-verification and short-chunk rows: each query row attends to
// its sequence's keys read in place through the block table, so no K/V pages are gathered into a copy.
//
// q        [T, Hq, D]      (rows may be strided; D contiguous)
// k_cache  [NB, BS, Hkv, D] and v_cache alike (D contiguous)
// tables   [B, MB] int64   block table of each sequence, padded
// row_seq  [T] int64       sequence of each query row; a sequence's rows are adjacent
// row_keys [T] int64       keys visible to the row: its position + 1 (causal, bottom-right aligned)
// row_mask [T] int64 or None  token trees: bit b clear hides key row_keys - 1 - b from the row (a node sees
//                             its ancestors, not its siblings' branches); keys older than 64 stay visible
// returns  [T, Hq, D] in q's dtype; softmax in float32.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "vec8.h"

template <typename T>
inline v8 load8(const T* p) {  // bfloat16 / half pages, widened to float (float pages take vec8.h's load8)
  float f[8];
  for (int i = 0; i < 8; ++i) f[i] = static_cast<float>(p[i]);
  return ::load8(static_cast<const float*>(f));
}

namespace {

// Lane t of the result is the sum of the lanes of a[t]: eight dot products finished at once.
inline v8 reduce8(const v8* a) {
#if defined(__AVX__)
  const __m256 t0 = _mm256_hadd_ps((__m256)a[0], (__m256)a[1]), t1 = _mm256_hadd_ps((__m256)a[2], (__m256)a[3]);
  const __m256 t2 = _mm256_hadd_ps((__m256)a[4], (__m256)a[5]), t3 = _mm256_hadd_ps((__m256)a[6], (__m256)a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return (v8)_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
#else
  v8 r;
  for (int t = 0; t < 8; ++t) {
    float s = 0.f;
    for (int i = 0; i < 8; ++i) s += a[t][i];
    r[t] = s;
  }
  return r;
#endif
}

// s[j] = q . k_j for the n keys at k, k + slot, ...; C = D / 8 vectors per head (0: any D, plain loops).
template <typename scalar_t, int C>
void dot_keys(const float* q, const scalar_t* k, int64_t slot, int64_t n, int64_t d, float* s) {
  int64_t j = 0;
  if constexpr (C > 0) {
    v8 qv[C];
    for (int c = 0; c < C; ++c) qv[c] = load8(q + c * 8);
    for (; j + 8 <= n; j += 8) {
      v8 a[8] = {};
      for (int c = 0; c < C; ++c)
        for (int t = 0; t < 8; ++t) a[t] += qv[c] * load8(k + (j + t) * slot + c * 8);
      store8(s + j, reduce8(a));
    }
  }
  for (; j < n; ++j) {
    const scalar_t* kj = k + j * slot;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < d; ++i) dot += q[i] * static_cast<float>(kj[i]);
    s[j] = dot;
  }
}

// acc += sum_j p[j] v_j over the n values at v, v + slot, ...
template <typename scalar_t, int C>
void add_values(float* acc, const float* p, const scalar_t* v, int64_t slot, int64_t n, int64_t d) {
  if constexpr (C > 0) {
    v8 a[C];
    for (int c = 0; c < C; ++c) a[c] = load8(acc + c * 8);
    for (int64_t j = 0; j < n; ++j) {
      const v8 pj = v8{} + p[j];
      for (int c = 0; c < C; ++c) a[c] += pj * load8(v + j * slot + c * 8);
    }
    for (int c = 0; c < C; ++c) store8(acc + c * 8, a[c]);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t* vj = v + j * slot;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) acc[i] += p[j] * static_cast<float>(vj[i]);
    }
  }
}

// Asks for the next page while this one is computed on: pages are scattered, so the hardware prefetcher,
// which follows addresses, stops at every page boundary.
template <typename scalar_t>
inline void prefetch_page(const scalar_t* page, int64_t elements) {
  const char* p = reinterpret_cast<const char*>(page);
  for (int64_t at = 0; at < elements * static_cast<int64_t>(sizeof(scalar_t)); at += 64) __builtin_prefetch(p + at);
}

// A unit of work, as in flash-decoding: every query row of one sequence against a slice of its blocks. The
// rows share each K/V page read (speculative verification reads a context once, not once per draft), and
// a long context spreads over all threads.
struct Item {
  int64_t row0, rows, first_block, last_block;
};

struct Layout {
  int64_t hq, d, group, bs;
  int64_t k_block, k_slot, k_head, v_block, v_slot, v_head;
};

constexpr float kHidden = -1.0e30f;  // score of a key a tree row must not see: exp() takes it to 0

// Hides the keys among the row's last 64 whose bit in `mask` is clear (s: the row's scores from key j0 on).
inline void hide_keys(float* s, uint64_t mask, int64_t end, int64_t j0, int64_t visible) {
  for (int64_t j = std::max<int64_t>(0, end - 64 - j0); j < visible; ++j)
    if (!((mask >> (end - 1 - j0 - j)) & 1)) s[j] = kHidden;
}

// Leaves, per query vector (row, head), {max, sum, unnormalised output[d]} of its softmax over the slice in
// `part`; sum 0 marks an empty slice.
template <typename scalar_t, int C>
void attend_slice(const Item& it, const Layout& L, const float* query, const scalar_t* kp, const scalar_t* vp,
                  const int64_t* table, const int64_t* keys, const int64_t* masks, float* part,
                  std::vector<float>& scores) {
  const int64_t hq = L.hq, d = L.d, nq = it.rows * hq, stride = d + 2;
  int64_t n_keys = 0;
  for (int64_t r = 0; r < it.rows; ++r) n_keys = std::max(n_keys, keys[r]);
  const int64_t j0 = it.first_block * L.bs, j1 = std::min(it.last_block * L.bs, n_keys);
  const int64_t count = std::max<int64_t>(0, j1 - j0);
  scores.resize(nq * count);  // every score is written below
  for (int64_t b = it.first_block; b * L.bs < j1; ++b) {
    const int64_t at = b * L.bs - j0, n = std::min(L.bs, j1 - b * L.bs);
    const scalar_t* kb = kp + table[b] * L.k_block;
    if ((b + 1) * L.bs < j1) prefetch_page(kp + table[b + 1] * L.k_block, L.bs * L.k_slot);
    for (int64_t qi = 0; qi < nq; ++qi)
      dot_keys<scalar_t, C>(query + qi * d, kb + (qi % hq / L.group) * L.k_head, L.k_slot, n, d,
                            scores.data() + qi * count + at);
  }
  for (int64_t qi = 0; qi < nq; ++qi) {
    float* s = scores.data() + qi * count;
    float* p = part + qi * stride;
    const int64_t visible = std::clamp<int64_t>(keys[qi / hq] - j0, 0, count);
    std::fill(p + 2, p + stride, 0.f);
    p[1] = 0.f;
    if (masks != nullptr && masks[qi / hq] != -1)
      hide_keys(s, static_cast<uint64_t>(masks[qi / hq]), keys[qi / hq], j0, visible);
    const float top = visible == 0 ? kHidden : *std::max_element(s, s + visible);
    if (top <= kHidden) {  // nothing this row may see in the slice
      std::fill(s, s + count, 0.f);
      continue;
    }
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < visible; ++j) {
      s[j] = std::exp(s[j] - top);
      total += s[j];
    }
    std::fill(s + visible, s + count, 0.f);  // keys past this row's position (a later draft's)
    p[0] = top;
    p[1] = total;
  }
  for (int64_t b = it.first_block; b * L.bs < j1; ++b) {
    const int64_t at = b * L.bs - j0, n = std::min(L.bs, j1 - b * L.bs);
    const scalar_t* vb = vp + table[b] * L.v_block;
    if ((b + 1) * L.bs < j1) prefetch_page(vp + table[b + 1] * L.v_block, L.bs * L.v_slot);
    for (int64_t qi = 0; qi < nq; ++qi)
      add_values<scalar_t, C>(part + qi * stride + 2, scores.data() + qi * count + at,
                              vb + (qi % hq / L.group) * L.v_head, L.v_slot, n, d);
  }
}

template <typename scalar_t, int C>
void attend_rows(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& tables, const at::Tensor& row_seq, const at::Tensor& row_keys,
                 const int64_t* masks, double scale, at::Tensor& out) {
  const int64_t rows = q.size(0), hq = q.size(1), d = q.size(2), stride = d + 2;
  const Layout L{hq,
                 d,
                 hq / k_cache.size(2),
                 k_cache.size(1),
                 k_cache.stride(0),
                 k_cache.stride(1),
                 k_cache.stride(2),
                 v_cache.stride(0),
                 v_cache.stride(1),
                 v_cache.stride(2)};
  const int64_t* seqp = row_seq.data_ptr<int64_t>();
  const int64_t* keysp = row_keys.data_ptr<int64_t>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t max_blocks = tables.size(1);

  // Runs of adjacent rows of one sequence, cut into slices of about equal block counts: enough items to
  // balance the threads, whatever the mix of context lengths.
  std::vector<int64_t> run_start, run_blocks;
  int64_t total_blocks = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (r == 0 || seqp[r] != seqp[r - 1]) {
      run_start.push_back(r);
      run_blocks.push_back(0);
    }
    run_blocks.back() = std::max(run_blocks.back(), (keysp[r] + L.bs - 1) / L.bs);
  }
  run_start.push_back(rows);
  for (int64_t b : run_blocks) total_blocks += b;
  const int64_t target = 8 * at::get_num_threads();
  const int64_t per = std::max<int64_t>(2, (total_blocks + target - 1) / target);
  std::vector<Item> items;
  std::vector<int64_t> run_items{0}, offset{0};  // items of run s: [run_items[s], run_items[s + 1])
  for (size_t s = 0; s + 1 < run_start.size(); ++s) {
    const int64_t n = std::max<int64_t>(1, run_blocks[s]), pieces = (n + per - 1) / per;
    const int64_t each = (n + pieces - 1) / pieces, row0 = run_start[s], nrows = run_start[s + 1] - row0;
    for (int64_t f = 0; f < n; f += each) {
      items.push_back({row0, nrows, f, std::min(n, f + each)});
      offset.push_back(offset.back() + nrows * hq * stride);
    }
    run_items.push_back(items.size());
  }
  std::vector<float> partial(offset.back());

  std::vector<float> query(rows * hq * d);  // float, scaled, contiguous
  const scalar_t* qp = q.data_ptr<scalar_t>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < hq; ++h)
      for (int64_t i = 0; i < d; ++i)
        query[(r * hq + h) * d + i] = static_cast<float>(qp[r * q.stride(0) + h * q.stride(1) + i]) * scale;

  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  at::parallel_for(0, items.size(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) {
      const Item& it = items[i];
      attend_slice<scalar_t, C>(it, L, query.data() + it.row0 * hq * d, kp, vp, tp + seqp[it.row0] * max_blocks,
                                keysp + it.row0, masks == nullptr ? nullptr : masks + it.row0,
                                partial.data() + offset[i], scores);
    }
  });

  // Merge each row's slices by their softmax maxima and sums (log-sum-exp).
  std::vector<int64_t> row_run(rows);
  for (size_t s = 0; s + 1 < run_start.size(); ++s)
    std::fill(row_run.begin() + run_start[s], row_run.begin() + run_start[s + 1], s);
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, rows * hq, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(d);
    for (int64_t x = begin; x < end; ++x) {
      const int64_t r = x / hq, s = row_run[r], qi = (r - run_start[s]) * hq + x % hq;
      float top = -3.0e38f, total = 0.f;
      for (int64_t i = run_items[s]; i < run_items[s + 1]; ++i) {
        const float* ps = partial.data() + offset[i] + qi * stride;
        if (ps[1] > 0.f) top = std::max(top, ps[0]);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t i = run_items[s]; i < run_items[s + 1]; ++i) {
        const float* ps = partial.data() + offset[i] + qi * stride;
        if (ps[1] == 0.f) continue;
        const float w = std::exp(ps[0] - top);
        total += w * ps[1];
        for (int64_t k = 0; k < d; ++k) acc[k] += w * ps[2 + k];
      }
      for (int64_t k = 0; k < d; ++k) op[x * d + k] = static_cast<scalar_t>(acc[k] / total);
    }
  });
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& tables, const at::Tensor& row_seq, const at::Tensor& row_keys,
                           double scale, const c10::optional<at::Tensor>& row_mask) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu(), "paged_attention_cpu runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad q / cache shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "head_dim must be contiguous");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0, "heads do not form GQA groups");
  TORCH_CHECK(tables.scalar_type() == at::kLong && tables.dim() == 2 && tables.is_contiguous(), "bad block tables");
  TORCH_CHECK(row_seq.scalar_type() == at::kLong && row_keys.scalar_type() == at::kLong, "row metadata must be int64");
  TORCH_CHECK(row_seq.numel() == q.size(0) && row_keys.numel() == q.size(0), "one row_seq / row_keys per query row");
  auto row_seq_c = row_seq.contiguous();
  auto row_keys_c = row_keys.contiguous();
  at::Tensor row_mask_c;
  const int64_t* masks = nullptr;
  if (row_mask.has_value() && row_mask->defined()) {
    TORCH_CHECK(row_mask->scalar_type() == at::kLong && row_mask->numel() == q.size(0), "one int64 mask per row");
    row_mask_c = row_mask->contiguous();
    masks = row_mask_c.data_ptr<int64_t>();
  }
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention_cpu", [&] {
    switch (q.size(2)) {  // the common head sizes keep a head's query in registers
      case 64: attend_rows<scalar_t, 8>(q, k_cache, v_cache, tables, row_seq_c, row_keys_c, masks, scale, out); break;
      case 128: attend_rows<scalar_t, 16>(q, k_cache, v_cache, tables, row_seq_c, row_keys_c, masks, scale, out); break;
      default: attend_rows<scalar_t, 0>(q, k_cache, v_cache, tables, row_seq_c, row_keys_c, masks, scale, out);
    }
  });
  return out;
}
