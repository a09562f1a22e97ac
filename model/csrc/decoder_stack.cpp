// Every decoder layer of a decode or verification step in one call (float32, one rank). At a few rows the
// kernels of a layer take microseconds, and driving them from Python (a dozen module calls, views and the K/V
// write per layer, 30 layers) cost about as much as the attention and the element-wise ops together. This
// runs the same kernels in the same order as `model.decoder.DecoderLayer.forward` with the CPU kernels on, so
// both paths give the same numbers; the Python path stays for prefill, tensor parallelism and other dtypes.
#include <torch/extension.h>

#include <cstring>
#include <vector>

#include "kernels.h"

namespace {

constexpr int64_t kFloatMaxRows = 16;  // small_matmul's limit
constexpr int64_t kPackedMaxRows = 256;  // as PackedWeight.matmul: quant_matmul's rows (its GEMM by tiles above 64)

// A linear layer's weight: float32 [N, K] (qtype -1) or GGUF blocks of N rows.
struct Linear {
  at::Tensor weight;
  int64_t qtype;
  int64_t n;
  c10::optional<at::Tensor> bias;

  at::Tensor operator()(const at::Tensor& x) const {
    return qtype < 0 ? small_matmul(x, weight, bias) : quant_matmul(x, weight, qtype, n, bias, -1, -1, -1);
  }
  int64_t max_rows() const { return qtype < 0 ? kFloatMaxRows : kPackedMaxRows; }
};

struct Layer {
  at::Tensor input_norm, post_norm;
  Linear qkv, o, gate_up, down;
};

}  // namespace

class DecoderStack {
 public:
  DecoderStack(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, double attn_scale,
               double residual_multiplier)
      : hq_(heads), hkv_(kv_heads), d_(head_dim), eps_(eps), scale_(attn_scale), mult_(residual_multiplier) {}

  // weights / qtypes / ns: qkv, o, gate_up, down in that order.
  void add_layer(const at::Tensor& input_norm, const at::Tensor& post_norm, const std::vector<at::Tensor>& weights,
                 const std::vector<int64_t>& qtypes, const std::vector<int64_t>& ns,
                 const c10::optional<at::Tensor>& qkv_bias) {
    TORCH_CHECK(weights.size() == 4 && qtypes.size() == 4 && ns.size() == 4, "a layer has 4 linear layers");
    Layer layer{input_norm, post_norm, {}, {}, {}, {}};
    Linear* linears[4] = {&layer.qkv, &layer.o, &layer.gate_up, &layer.down};
    for (int i = 0; i < 4; ++i) {
      *linears[i] = Linear{weights[i], qtypes[i], ns[i], i == 0 ? qkv_bias : c10::nullopt};
      max_rows_ = std::min(max_rows_, linears[i]->max_rows());
    }
    layers_.push_back(std::move(layer));
  }

  int64_t max_rows() const { return max_rows_; }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x [T, hidden] (the embeddings; updated in place as the residual stream and returned), cos/sin [T, 1, D],
  // kv [layers, 2, blocks, block_size, kv_heads, D], slots [T]: each row's K/V slot; the rest as for
  // paged_attention.
  at::Tensor forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& kv,
                     const at::Tensor& slots, const at::Tensor& tables, const at::Tensor& row_seq,
                     const at::Tensor& row_keys, const c10::optional<at::Tensor>& row_mask) {
    const int64_t t = x.size(0), width = (hq_ + 2 * hkv_) * d_, kv_row = hkv_ * d_;
    TORCH_CHECK(x.scalar_type() == at::kFloat && kv.scalar_type() == at::kFloat, "the decoder stack is float32");
    TORCH_CHECK(t <= max_rows_, "the decoder stack takes at most ", max_rows_, " rows");
    TORCH_CHECK(kv.dim() == 6 && kv.size(0) >= num_layers() && kv.size(4) == hkv_ && kv.size(5) == d_ &&
                    kv.is_contiguous(),
                "kv must be contiguous [layers, 2, blocks, block_size, kv_heads, head_dim]");
    TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == t, "one int64 slot per row");
    const at::Tensor slots_c = slots.contiguous();
    const int64_t* slot = slots_c.data_ptr<int64_t>();
    const int64_t num_slots = kv.size(2) * kv.size(3);
    for (int64_t r = 0; r < t; ++r) TORCH_CHECK(slot[r] >= 0 && slot[r] < num_slots, "slot out of range");
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& L = layers_[i];
      at::Tensor h = rms_norm(x, c10::nullopt, L.input_norm, eps_);
      at::Tensor qkv = L.qkv(h);
      TORCH_CHECK(qkv.size(1) == width, "the qkv projection has ", qkv.size(1), " features, not ", width);
      qkv = qkv.view({t, hq_ + 2 * hkv_, d_});
      at::Tensor qk = qkv.narrow(1, 0, hq_ + hkv_);  // q and k heads are adjacent: one RoPE pass for both
      rope_(qk, cos, sin);
      at::Tensor k_cache = kv.select(0, i).select(0, 0), v_cache = kv.select(0, i).select(0, 1);
      float* kp = k_cache.data_ptr<float>();
      float* vp = v_cache.data_ptr<float>();
      const float* rows = qkv.data_ptr<float>();
      for (int64_t r = 0; r < t; ++r) {  // this step's K/V into their slots
        std::memcpy(kp + slot[r] * kv_row, rows + r * width + hq_ * d_, kv_row * sizeof(float));
        std::memcpy(vp + slot[r] * kv_row, rows + r * width + (hq_ + hkv_) * d_, kv_row * sizeof(float));
      }
      at::Tensor attn =
          paged_attention(qkv.narrow(1, 0, hq_), k_cache, v_cache, tables, row_seq, row_keys, scale_, row_mask);
      at::Tensor o = scaled(L.o(attn.view({t, hq_ * d_})));
      h = rms_norm(x, o, L.post_norm, eps_);  // x += attention output
      x.add_(scaled(L.down(silu_mul(L.gate_up(h)))));
    }
    return x;
  }

 private:
  at::Tensor scaled(at::Tensor h) const { return mult_ == 1.0 ? h : h.mul_(mult_); }

  int64_t hq_, hkv_, d_;
  double eps_, scale_, mult_;
  int64_t max_rows_ = kPackedMaxRows;
  std::vector<Layer> layers_;
};

void bind_decoder_stack(pybind11::module& m) {
  pybind11::class_<DecoderStack>(m, "DecoderStack",
                                 "every decoder layer of a decode / verification step in one call (float32)")
      .def(pybind11::init<int64_t, int64_t, int64_t, double, double, double>(), pybind11::arg("heads"),
           pybind11::arg("kv_heads"), pybind11::arg("head_dim"), pybind11::arg("eps"), pybind11::arg("attn_scale"),
           pybind11::arg("residual_multiplier"))
      .def("add_layer", &DecoderStack::add_layer, pybind11::arg("input_norm"), pybind11::arg("post_norm"),
           pybind11::arg("weights"), pybind11::arg("qtypes"), pybind11::arg("ns"), pybind11::arg("qkv_bias"))
      .def("max_rows", &DecoderStack::max_rows)
      .def("forward", &DecoderStack::forward, pybind11::call_guard<pybind11::gil_scoped_release>(),
           pybind11::arg("x"), pybind11::arg("cos"), pybind11::arg("sin"), pybind11::arg("kv"), pybind11::arg("slots"),
           pybind11::arg("tables"), pybind11::arg("row_seq"), pybind11::arg("row_keys"),
           pybind11::arg("row_mask") = pybind11::none());
}
