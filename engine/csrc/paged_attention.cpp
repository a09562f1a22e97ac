// Paged attention on CPU for decode and speculative-verification rows: each query row attends to its
// sequence's keys read in place through the block table, so no K/V pages are gathered into a copy.
//
// q        [T, Hq, D]      (rows may be strided; D contiguous)
// k_cache  [NB, BS, Hkv, D] and v_cache alike (D contiguous)
// tables   [B, MB] int64   block table of each sequence, padded
// row_seq  [T] int64       sequence of each query row
// row_keys [T] int64       keys visible to the row: its position + 1 (causal, bottom-right aligned)
// returns  [T, Hq, D] in q's dtype; softmax in float32.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// Work is split as in flash-decoding: an item is (query row, slice of the row's blocks), so one sequence's
// long context still spreads over all threads, and each item streams its pages front to back (every KV head
// of a slot is adjacent in memory) while all query heads use each K/V row it reads. Each item leaves, per
// query head, its softmax max, sum and unnormalised output; a second pass merges the slices of a row.
template <typename scalar_t>
void attend_rows(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& tables, const at::Tensor& row_seq, const at::Tensor& row_keys,
                 double scale, at::Tensor& out) {
  const int64_t rows = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t bs = k_cache.size(1), group = hq / k_cache.size(2);
  const int64_t max_blocks = tables.size(1);
  const int64_t splits =
      std::max<int64_t>(1, std::min<int64_t>(max_blocks, (4 * at::get_num_threads() + rows - 1) / rows));
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* seqp = row_seq.data_ptr<int64_t>();
  const int64_t* keysp = row_keys.data_ptr<int64_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t q_row = q.stride(0), q_head = q.stride(1);
  const int64_t k_block = k_cache.stride(0), k_slot = k_cache.stride(1), k_head = k_cache.stride(2);
  const int64_t v_block = v_cache.stride(0), v_slot = v_cache.stride(1), v_head = v_cache.stride(2);
  const float fscale = static_cast<float>(scale);
  // partial[((row * splits + split) * hq + head)] = {max, sum, acc[d]}; an empty slice has sum 0
  const int64_t stride = d + 2;
  std::vector<float> partial(rows * splits * hq * stride);

  at::parallel_for(0, rows * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(hq * d), acc(hq * d), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / splits, split = item % splits;
      const int64_t n = keysp[r], blocks = (n + bs - 1) / bs, per = (blocks + splits - 1) / splits;
      const int64_t first = std::min(split * per, blocks), last = std::min(first + per, blocks);
      const int64_t j0 = first * bs, count = std::max<int64_t>(0, std::min(last * bs, n) - j0);
      const int64_t* table = tp + seqp[r] * max_blocks;
      float* part = partial.data() + item * hq * stride;
      if (count == 0) {
        for (int64_t h = 0; h < hq; ++h) part[h * stride + 1] = 0.f;
        continue;
      }
      for (int64_t h = 0; h < hq; ++h) {
        const scalar_t* qv = qp + r * q_row + h * q_head;
        for (int64_t i = 0; i < d; ++i) query[h * d + i] = static_cast<float>(qv[i]) * fscale;
      }
      scores.resize(hq * count);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t pos = j0 + j;
        const scalar_t* ks = kp + table[pos / bs] * k_block + (pos % bs) * k_slot;
        for (int64_t h = 0; h < hq; ++h) {
          const scalar_t* kv = ks + (h / group) * k_head;
          const float* qh = query.data() + h * d;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < d; ++i) dot += qh[i] * static_cast<float>(kv[i]);
          scores[h * count + j] = dot;
        }
      }
      for (int64_t h = 0; h < hq; ++h) {
        float* sh = scores.data() + h * count;
        float top = sh[0];
        for (int64_t j = 1; j < count; ++j) top = std::max(top, sh[j]);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < count; ++j) {
          sh[j] = std::exp(sh[j] - top);
          total += sh[j];
        }
        part[h * stride] = top;
        part[h * stride + 1] = total;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t pos = j0 + j;
        const scalar_t* vs = vp + table[pos / bs] * v_block + (pos % bs) * v_slot;
        for (int64_t h = 0; h < hq; ++h) {
          const scalar_t* vv = vs + (h / group) * v_head;
          float* ah = acc.data() + h * d;
          const float p = scores[h * count + j];
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) ah[i] += p * static_cast<float>(vv[i]);
        }
      }
      for (int64_t h = 0; h < hq; ++h) std::copy_n(acc.data() + h * d, d, part + h * stride + 2);
    }
  });

  at::parallel_for(0, rows * hq, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / hq, h = item % hq;
      float top = -3.0e38f;
      for (int64_t s = 0; s < splits; ++s) {
        const float* ps = partial.data() + ((r * splits + s) * hq + h) * stride;
        if (ps[1] > 0.f) top = std::max(top, ps[0]);
      }
      float total = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s = 0; s < splits; ++s) {
        const float* ps = partial.data() + ((r * splits + s) * hq + h) * stride;
        if (ps[1] == 0.f) continue;
        const float w = std::exp(ps[0] - top);
        total += w * ps[1];
        for (int64_t i = 0; i < d; ++i) acc[i] += w * ps[2 + i];
      }
      scalar_t* o = op + item * d;
      for (int64_t i = 0; i < d; ++i) o[i] = static_cast<scalar_t>(acc[i] / total);
    }
  });
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& tables, const at::Tensor& row_seq, const at::Tensor& row_keys,
                           double scale) {
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
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention_cpu", [&] {
    attend_rows<scalar_t>(q, k_cache, v_cache, tables, row_seq_c, row_keys_c, scale, out);
  });
  return out;
}

