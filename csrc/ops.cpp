// TORCH_LIBRARY schemas, input checks and backend registrations for fused_pos_attn._C.
// Python (fused_pos_attn/attention.py) validates every argument with a clear message first; the checks
// here only guard the kernels against direct misuse of torch.ops.fused_pos_attn.*.
#include <torch/extension.h>

#include <string>

#include "cpu/cpu_kernels.h"
#include "fused_pos_attn/attention_params.h"

namespace fused_pos_attn {
namespace {

constexpr int64_t kMaxHeadDim = 256;

// Position and masking arguments shared by both ops' schemas.
#define FPA_POSITION_SCHEMA                                                                                   \
  "Tensor q_offset, Tensor k_offset, int pos, Tensor slopes, Tensor inv_freq, int rotary_dim, bool interleaved, " \
  "float attention_factor, Tensor rel_bias, int max_distance, bool causal, int window, float scale"

AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_offset,
                            const at::Tensor& k_offset, int64_t pos, const at::Tensor& slopes,
                            const at::Tensor& inv_freq, int64_t rotary_dim, bool interleaved,
                            double attention_factor, const at::Tensor& rel_bias, int64_t max_distance, bool causal,
                            int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), "q and k must share batch and head dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "Hq must be a multiple of Hkv");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, "head dim must be in [1, 256]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(pos >= 0 && pos <= static_cast<int64_t>(PosKind::kRelative), "unknown position kind ", pos);
  const int64_t batch = q.size(0);
  for (const at::Tensor* off : {&q_offset, &k_offset}) {
    TORCH_CHECK(off->scalar_type() == at::kLong && off->dim() == 1 && off->size(0) == batch && off->is_contiguous(),
                "offsets must be contiguous (B,) int64 tensors");
  }
  TORCH_CHECK(slopes.scalar_type() == at::kFloat && slopes.dim() == 2 && slopes.size(0) == batch &&
                  slopes.size(1) == q.size(1),
              "slopes must be a (B, Hq) float32 tensor");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.is_contiguous(), "inv_freq must be contiguous fp32");
  if (pos == static_cast<int64_t>(PosKind::kRope)) {
    TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= q.size(3), "rotary_dim must be even, <= D");
    TORCH_CHECK(inv_freq.numel() == rotary_dim / 2, "inv_freq must have rotary_dim / 2 entries");
  }
  if (pos == static_cast<int64_t>(PosKind::kRelative)) {
    TORCH_CHECK(max_distance >= 1, "max_distance must be >= 1");
    TORCH_CHECK(rel_bias.scalar_type() == at::kFloat && rel_bias.is_contiguous() && rel_bias.dim() == 3 &&
                    rel_bias.size(0) == q.size(1) && rel_bias.size(1) == 2 && rel_bias.size(2) == max_distance + 1,
                "rel_bias must be a contiguous (Hq, 2, max_distance + 1) float32 tensor");
  }
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: none)");

  AttentionParams p;
  p.batch = batch;
  p.heads_q = q.size(1);
  p.heads_kv = k.size(1);
  p.seq_q = q.size(2);
  p.seq_k = k.size(2);
  p.head_dim = q.size(3);
  p.q_offset = q_offset.data_ptr<int64_t>();
  p.k_offset = k_offset.data_ptr<int64_t>();
  p.pos = static_cast<PosKind>(pos);
  p.slopes = slopes.data_ptr<float>();
  p.slope_stride_b = slopes.stride(0);
  p.slope_stride_h = slopes.stride(1);
  p.inv_freq = inv_freq.data_ptr<float>();
  p.rotary_dim = static_cast<int>(rotary_dim);
  p.interleaved = interleaved;
  p.attention_factor = attention_factor;
  p.rel_bias = rel_bias.data_ptr<float>();
  p.max_distance = max_distance;
  p.causal = causal;
  p.window = window;
  p.scale = scale;
  return p;
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& q_offset, const at::Tensor& k_offset, int64_t pos,
                                               const at::Tensor& slopes, const at::Tensor& inv_freq,
                                               int64_t rotary_dim, bool interleaved, double attention_factor,
                                               const at::Tensor& rel_bias, int64_t max_distance, bool causal,
                                               int64_t window, double scale) {
  const AttentionParams p = make_params(q, k, v, q_offset, k_offset, pos, slopes, inv_freq, rotary_dim, interleaved,
                                        attention_factor, rel_bias, max_distance, causal, window, scale);
  return cpu::attention_forward(q, k, v, p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& q_offset, const at::Tensor& k_offset, int64_t pos,
    const at::Tensor& slopes, const at::Tensor& inv_freq, int64_t rotary_dim, bool interleaved,
    double attention_factor, const at::Tensor& rel_bias, int64_t max_distance, bool causal, int64_t window,
    double scale) {
  const AttentionParams p = make_params(q, k, v, q_offset, k_offset, pos, slopes, inv_freq, rotary_dim, interleaved,
                                        attention_factor, rel_bias, max_distance, causal, window, scale);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "grad_out and out must have q's shape");
  TORCH_CHECK(lse.is_contiguous() && lse.dim() == 3, "lse must be a contiguous (B, Hq, Nq) tensor");
  return cpu::attention_backward(grad_out, q, k, v, out, lse, p);
}

std::string build_info() {
#ifdef FUSED_POS_ATTN_WITH_CUDA
  return "cpu+cuda";
#else
  return "cpu";
#endif
}

}  // namespace
}  // namespace fused_pos_attn

TORCH_LIBRARY(fused_pos_attn, m) {
  m.def("build_info() -> str", &fused_pos_attn::build_info);
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, " FPA_POSITION_SCHEMA ") -> (Tensor out, Tensor lse)");
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        FPA_POSITION_SCHEMA ") -> (Tensor dq, Tensor dk, Tensor dv, Tensor d_rel_bias)");
}

TORCH_LIBRARY_IMPL(fused_pos_attn, CPU, m) {
  m.impl("attention_forward", &fused_pos_attn::forward_cpu);
  m.impl("attention_backward", &fused_pos_attn::backward_cpu);
}

// Empty Python module so `import fused_pos_attn._C` loads the library and runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
