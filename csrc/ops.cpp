// TORCH_LIBRARY schemas, input checks and backend registrations for fused_pos_attn._C.
// Python (fused_pos_attn/attention.py) validates every argument with a clear message first; the checks
// here only guard the kernels against direct misuse of torch.ops.fused_pos_attn.*.
#include <torch/extension.h>

#include <stdexcept>
#include <string>

#include "cpu/cpu_kernels.h"
#include "fused_pos_attn/attention_params.h"

#ifdef FUSED_POS_ATTN_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launch.h"
#endif

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

#ifdef FUSED_POS_ATTN_WITH_CUDA
// CUDA kernels (csrc/cuda): fp16 / bf16, head dim 64 / 128, unit stride along the head dim (the Python cuda
// backend copies an input only when that stride is not 1). Other strides are free.
gpu::DType cuda_dtype(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "fused_pos_attn CUDA kernels support float16 and bfloat16, got ", q.scalar_type());
  TORCH_CHECK(gpu::supported_head_dim(q.size(3)), "fused_pos_attn CUDA kernels support head dim 64 or 128, got ",
              q.size(3));
  return q.scalar_type() == at::kHalf ? gpu::DType::kFloat16 : gpu::DType::kBFloat16;
}

void check_same_cuda_device(const at::Tensor& q, std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor");
  for (const auto& [name, t] : ts) {
    TORCH_CHECK(t->numel() == 0 || t->device() == q.device(), name, " must be on ", q.device(), ", got ", t->device());
  }
}

gpu::Tensor4 tensor4(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(3) == 1, name, " must have unit stride along the head dim for the CUDA kernels");
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// An output like t (its layout when it has unit head-dim stride and even strides, which the kernels' paired
// stores need; contiguous otherwise).
at::Tensor output_like(const at::Tensor& t) {
  at::Tensor out = at::empty_like(t);
  const bool paired = out.stride(3) == 1 && out.stride(0) % 2 == 0 && out.stride(1) % 2 == 0 && out.stride(2) % 2 == 0;
  return paired ? out : at::empty(t.sizes(), t.options());
}

// Runs a launcher: std::invalid_argument (unsupported dtype / head dim / grid) and CUDA errors become torch errors.
template <typename Launch>
void run_cuda(Launch&& launch) {
  cudaError_t err;
  try {
    err = launch();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
  C10_CUDA_CHECK(err);
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& q_offset, const at::Tensor& k_offset, int64_t pos,
                                                const at::Tensor& slopes, const at::Tensor& inv_freq,
                                                int64_t rotary_dim, bool interleaved, double attention_factor,
                                                const at::Tensor& rel_bias, int64_t max_distance, bool causal,
                                                int64_t window, double scale) {
  check_same_cuda_device(q, {{"k", &k}, {"v", &v}, {"q_offset", &q_offset}, {"k_offset", &k_offset},
                             {"slopes", &slopes}, {"inv_freq", &inv_freq}, {"rel_bias", &rel_bias}});
  const gpu::DType dtype = cuda_dtype(q);
  const AttentionParams p = make_params(q, k, v, q_offset, k_offset, pos, slopes, inv_freq, rotary_dim, interleaved,
                                        attention_factor, rel_bias, max_distance, causal, window, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = output_like(q);
  at::Tensor lse = at::empty({p.batch, p.heads_q, p.seq_q}, q.options().dtype(at::kFloat));
  run_cuda([&] {
    return gpu::attention_forward(p, dtype, tensor4(q, "q"), tensor4(k, "k"), tensor4(v, "v"), tensor4(out, "out"),
                                  lse.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& q_offset, const at::Tensor& k_offset, int64_t pos,
    const at::Tensor& slopes, const at::Tensor& inv_freq, int64_t rotary_dim, bool interleaved,
    double attention_factor, const at::Tensor& rel_bias, int64_t max_distance, bool causal, int64_t window,
    double scale) {
  check_same_cuda_device(q, {{"grad_out", &grad_out}, {"k", &k}, {"v", &v}, {"out", &out}, {"lse", &lse},
                             {"q_offset", &q_offset}, {"k_offset", &k_offset}, {"slopes", &slopes},
                             {"inv_freq", &inv_freq}, {"rel_bias", &rel_bias}});
  const gpu::DType dtype = cuda_dtype(q);
  const AttentionParams p = make_params(q, k, v, q_offset, k_offset, pos, slopes, inv_freq, rotary_dim, interleaved,
                                        attention_factor, rel_bias, max_distance, causal, window, scale);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "grad_out and out must have q's shape");
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "grad_out and out must have q's dtype");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 3,
              "lse must be a contiguous (B, Hq, Nq) float32 tensor");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = output_like(q), dk = output_like(k), dv = output_like(v);
  const bool relative = pos == static_cast<int64_t>(PosKind::kRelative);
  at::Tensor d_rel_bias = relative ? at::empty({p.heads_q, 2, max_distance + 1}, q.options().dtype(at::kFloat))
                                   : at::empty({0}, q.options().dtype(at::kFloat));
  at::Tensor dq_accum = at::empty({p.batch, p.heads_q, p.seq_q, p.head_dim}, q.options().dtype(at::kFloat));
  at::Tensor delta = at::empty({p.batch, p.heads_q, p.seq_q}, q.options().dtype(at::kFloat));
  run_cuda([&] {
    return gpu::attention_backward(p, dtype, tensor4(grad_out, "grad_out"), tensor4(q, "q"), tensor4(k, "k"),
                                   tensor4(v, "v"), tensor4(out, "out"), lse.data_ptr<float>(), tensor4(dq, "dq"),
                                   tensor4(dk, "dk"), tensor4(dv, "dv"),
                                   relative ? d_rel_bias.data_ptr<float>() : nullptr,
                                   {dq_accum.data_ptr<float>(), delta.data_ptr<float>()},
                                   c10::cuda::getCurrentCUDAStream().stream());
  });
  return {dq, dk, dv, d_rel_bias};
}
#endif  // FUSED_POS_ATTN_WITH_CUDA

// Evaluates position.h's helpers on a grid (CPU), for tests that check the C++ header, the Triton helpers
// and the Python reference agree. rel, slopes: (N,); positions, inv_freq: (M,). Per entry i of rel:
// clamp_rel, alibi_bias(slopes[i], rel[i]), key_visible(rel[i], causal, window), relative_bias_index(rel[i],
// max_distance), and visible_keys(q_pos = rel[i], k_offset = 0, seq_k, causal, window) as (first, last);
// per head-dim column d < head_dim: rope_column(d, rotary_dim, interleaved) as (partner, freq_index, sign);
// per entry of positions: rope_angle(positions[i], inv_freq[i]).
std::vector<at::Tensor> position_probe(const at::Tensor& rel, const at::Tensor& slopes, const at::Tensor& positions,
                                       const at::Tensor& inv_freq, int64_t head_dim, int64_t rotary_dim,
                                       bool interleaved, int64_t max_distance, bool causal, int64_t window,
                                       int64_t seq_k) {
  TORCH_CHECK(rel.scalar_type() == at::kLong && rel.dim() == 1, "rel must be a 1-D int64 tensor");
  TORCH_CHECK(slopes.scalar_type() == at::kFloat && slopes.sizes() == rel.sizes(), "slopes must be fp32 like rel");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1, "positions must be a 1-D int64 tensor");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.sizes() == positions.sizes(),
              "inv_freq must be fp32 like positions");
  const at::Tensor r = rel.contiguous(), s = slopes.contiguous(), pos = positions.contiguous();
  const at::Tensor f = inv_freq.contiguous();
  const int64_t n = r.numel(), m = pos.numel();
  const auto i64 = r.options(), f32 = s.options();
  at::Tensor clamped = at::empty({n}, i64), alibi = at::empty({n}, f32), visible = at::empty({n}, i64.dtype(at::kBool));
  at::Tensor index = at::empty({n}, i64), first = at::empty({n}, i64), last = at::empty({n}, i64);
  at::Tensor partner = at::empty({head_dim}, i64), freq_index = at::empty({head_dim}, i64);
  at::Tensor sign = at::empty({head_dim}, f32), angle = at::empty({m}, f32);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t x = r.data_ptr<int64_t>()[i];
    clamped.data_ptr<int64_t>()[i] = clamp_rel(x);
    alibi.data_ptr<float>()[i] = alibi_bias(s.data_ptr<float>()[i], x);
    visible.data_ptr<bool>()[i] = key_visible(x, causal, window);
    index.data_ptr<int64_t>()[i] = relative_bias_index(x, max_distance);
    const KeyInterval iv = visible_keys(x, 0, seq_k, causal, window);
    first.data_ptr<int64_t>()[i] = iv.first;
    last.data_ptr<int64_t>()[i] = iv.last;
  }
  for (int64_t d = 0; d < head_dim; ++d) {
    const RopeColumn col = rope_column(static_cast<int>(d), static_cast<int>(rotary_dim), interleaved);
    partner.data_ptr<int64_t>()[d] = col.partner;
    freq_index.data_ptr<int64_t>()[d] = col.freq_index;
    sign.data_ptr<float>()[d] = col.sign;
  }
  for (int64_t i = 0; i < m; ++i) {
    angle.data_ptr<float>()[i] = rope_angle(pos.data_ptr<int64_t>()[i], f.data_ptr<float>()[i]);
  }
  return {clamped, alibi, visible, index, first, last, partner, freq_index, sign, angle};
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
  m.def("position_probe(Tensor rel, Tensor slopes, Tensor positions, Tensor inv_freq, int head_dim, int rotary_dim, "
        "bool interleaved, int max_distance, bool causal, int window, int seq_k) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fused_pos_attn, CPU, m) {
  m.impl("attention_forward", &fused_pos_attn::forward_cpu);
  m.impl("attention_backward", &fused_pos_attn::backward_cpu);
  m.impl("position_probe", &fused_pos_attn::position_probe);
}

#ifdef FUSED_POS_ATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(fused_pos_attn, CUDA, m) {
  m.impl("attention_forward", &fused_pos_attn::forward_cuda);
  m.impl("attention_backward", &fused_pos_attn::backward_cuda);
}
#endif

// Empty Python module so `import fused_pos_attn._C` loads the library and runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
