// The Python module of sdlab's CPU kernels (sdlab.models.cpu_kernels builds it from this folder's sources).
#include <torch/extension.h>

bool reuse_enter();
void reuse_leave();
std::vector<int64_t> reuse_stats();

#ifdef __AVX512BF16__
at::Tensor flash_attention_bf16(at::Tensor q, at::Tensor k, at::Tensor v, int64_t heads, double scale2,
                                   bool allow_amx);
bool uses_amx();
at::Tensor group_norm_bf16(at::Tensor x, c10::optional<at::Tensor> weight, c10::optional<at::Tensor> bias,
                           int64_t groups, double eps, bool silu, bool overwrite);
at::Tensor layer_norm_bf16(at::Tensor x, c10::optional<at::Tensor> weight, c10::optional<at::Tensor> bias, double eps);
at::Tensor patch_product_bf16(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, int64_t k,
                              int64_t stride, int64_t pad);
at::Tensor geglu_bf16(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias);
at::Tensor linear_bf16(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, c10::optional<at::Tensor> other);
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("reuse_enter", &reuse_enter);
    m.def("reuse_leave", &reuse_leave);
    m.def("reuse_stats", &reuse_stats);
#ifdef __AVX512BF16__
    m.def("flash_attention_bf16", &flash_attention_bf16);
    m.def("uses_amx", &uses_amx);
    m.def("group_norm_bf16", &group_norm_bf16);
    m.def("layer_norm_bf16", &layer_norm_bf16);
    m.def("patch_product_bf16", &patch_product_bf16);
    m.def("geglu_bf16", &geglu_bf16);
    m.def("linear_bf16", &linear_bf16);
#endif
}
