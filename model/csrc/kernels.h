// The kernels' entry points, shared by the bindings and the decoder stack (each defined in its own .cpp).
#pragma once

#include <torch/extension.h>

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& tables, const at::Tensor& row_seq, const at::Tensor& row_keys,
                           double scale, const c10::optional<at::Tensor>& row_mask);
at::Tensor small_matmul(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
at::Tensor rms_norm(at::Tensor& x, const c10::optional<at::Tensor>& delta, const at::Tensor& weight, double eps);
void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& gate_up);
at::Tensor quant_matmul(const at::Tensor& x, const at::Tensor& wq, int64_t qtype, int64_t n,
                        const c10::optional<at::Tensor>& bias, int64_t width, int64_t direct_rows, int64_t gemm_rows);
void set_quant_gemm_mask(uint64_t mask);
uint64_t quant_gemm_mask();
at::Tensor quant_dequantize(const at::Tensor& wq, int64_t qtype, int64_t n, int64_t k);
std::vector<int64_t> quant_matmul_widths();
void set_quant_width(int64_t bits);
int64_t quant_width();
void bind_decoder_stack(pybind11::module& m);
