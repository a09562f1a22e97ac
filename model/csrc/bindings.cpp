// Python bindings of the CPU kernels (one extension module, built by model/cpu_kernels.py).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "paged attention over block tables, K/V read in place",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("tables"), py::arg("row_seq"),
        py::arg("row_keys"), py::arg("scale"), py::arg("row_mask") = py::none());
  m.def("small_matmul", &small_matmul, "x W^T (+ bias) for at most 16 rows of x, float32");
  m.def("rms_norm", &rms_norm, "x += delta (if given, in place), then RMSNorm(x) * weight; float32");
  m.def("rope_", &rope_, "rotary embedding in place, rotate-half convention; float32");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a [T, 2I] gate|up tensor; float32");
  m.def("quant_matmul", &quant_matmul, "x W^T (+ bias), W in GGUF blocks (Q4_0, Q4_1, Q8_0); more rows than direct_rows (-1: "
        "16, with AVX-512 32) dequantize tiles of W; a GEMM by tiles takes more rows than gemm_rows (-1: the row counts in "
        "quant_gemm_mask(), and always more than 64)", py::arg("x"), py::arg("wq"), py::arg("qtype"), py::arg("n"), py::arg("bias") = py::none(),
        py::arg("width") = -1, py::arg("direct_rows") = -1, py::arg("gemm_rows") = -1);
  m.def("set_quant_gemm_mask", &set_quant_gemm_mask, "bit m - 1 set: quant_matmul takes m rows (1-64) by its GEMM path");
  m.def("quant_gemm_mask", &quant_gemm_mask, "the row counts quant_matmul takes by its GEMM path, as a bit mask");
  m.def("quant_dequantize", &quant_dequantize, "float32 [N, K] of a matrix in GGUF blocks");
  m.def("quant_matmul_widths", &quant_matmul_widths, "the vector widths in bits quant_matmul's width takes: 0 (plain "
        "C++), 256 (AVX2), 512 (AVX-512), as built for this CPU; -1 is quant_width()");
  m.def("set_quant_width", &set_quant_width, "the width quant_matmul takes when called with -1 (the decoder stack "
        "always is), for this process; -1: the widest");
  m.def("quant_width", &quant_width, "the width quant_matmul takes when called with -1");
  bind_decoder_stack(m);
}
