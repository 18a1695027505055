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

// FPA_CALL_ARGS (attention_params.h) as the ops see them: the schema text, C++ parameters, and OpCallArgs, one
// struct holding them all (so make_params takes one argument, whatever the list holds).
#define FPA_OP_TYPE_Tensor const at::Tensor&
#define FPA_OP_TYPE_int int64_t
#define FPA_OP_TYPE_bool bool
#define FPA_OP_TYPE_float double
#define FPA_SCHEMA_ARG(schema_type, name, field_type) ", " #schema_type " " #name
#define FPA_OP_PARAM(schema_type, name, field_type) , FPA_OP_TYPE_##schema_type name
#define FPA_OP_MEMBER(schema_type, name, field_type) FPA_OP_TYPE_##schema_type name;
#define FPA_OP_NAME(schema_type, name, field_type) name,
// ", Tensor q_offset, Tensor k_offset, int pos, ...": the schema's position and masking arguments.
#define FPA_CALL_SCHEMA FPA_CALL_ARGS(FPA_SCHEMA_ARG)
// The same as C++ parameters, and the OpCallArgs built from them inside an op.
#define FPA_CALL_PARAMS FPA_CALL_ARGS(FPA_OP_PARAM)
#define FPA_OP_CALL_ARGS OpCallArgs{FPA_CALL_ARGS(FPA_OP_NAME)}

struct OpCallArgs {
  FPA_CALL_ARGS(FPA_OP_MEMBER)
};

AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OpCallArgs& a) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape");
  const bool paged = a.page_size > 0;
  TORCH_CHECK((paged ? k.size(0) == 1 : q.size(0) == k.size(0)) && q.size(3) == k.size(3),
              "q and k must share batch and head dim (a paged cache: k / v (1, Hkv, num_pages * page_size, D))");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "Hq must be a multiple of Hkv");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, "head dim must be in [1, 256]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(is_pos_kind(a.pos), "unknown position kind ", a.pos);
  // The packed (varlen) layout: cu_seqlens_q / cu_seqlens_k (S + 1,) int64, q / k / v one tensor batch; the call's
  // batch is then S. A dense call passes both empty and max_seqlen 0.
  for (const auto& [name, cu] :
       {std::pair{"cu_seqlens_q", &a.cu_seqlens_q}, std::pair{"cu_seqlens_k", &a.cu_seqlens_k}}) {
    TORCH_CHECK(cu->scalar_type() == at::kLong && cu->dim() == 1 && cu->is_contiguous(), name,
                " must be a contiguous 1-D int64 tensor ((S + 1,) for packed sequences, (0,) for a dense call), got ",
                cu->scalar_type(), " of shape ", cu->sizes());
    TORCH_CHECK(cu->device() == q.device(), name, " must be on q's device ", q.device(), ", got ", cu->device());
  }
  TORCH_CHECK(a.cu_seqlens_q.size(0) == a.cu_seqlens_k.size(0),
              "cu_seqlens_q and cu_seqlens_k must have the same length (S + 1 packed, 0 dense), got ",
              a.cu_seqlens_q.size(0), " and ", a.cu_seqlens_k.size(0));
  const bool varlen = a.cu_seqlens_q.size(0) > 0;
  if (varlen) {
    TORCH_CHECK(q.size(0) == 1, "packed (varlen) q, k, v must be (1, H, total, D) views, got q of shape ", q.sizes());
    TORCH_CHECK(a.max_seqlen_q >= 0 && a.max_seqlen_k >= 0, "max_seqlen_q and max_seqlen_k must be >= 0, got ",
                a.max_seqlen_q, " and ", a.max_seqlen_k);
  } else {
    TORCH_CHECK(a.max_seqlen_q == 0 && a.max_seqlen_k == 0,
                "max_seqlen_q and max_seqlen_k must be 0 for a dense call (empty cu_seqlens), got ", a.max_seqlen_q,
                " and ", a.max_seqlen_k);
  }
  const int64_t batch = varlen ? a.cu_seqlens_q.size(0) - 1 : q.size(0);  // B, or S sequences
  // KV caches (dense layout): seqused_k (B,) int64 or empty; a paged cache's block_table (B, max_pages) int64.
  TORCH_CHECK(a.seqused_k.scalar_type() == at::kLong && a.seqused_k.dim() == 1 && a.seqused_k.is_contiguous() &&
                  (a.seqused_k.size(0) == 0 || (!varlen && a.seqused_k.size(0) == batch)),
              "seqused_k must be a contiguous (B,) int64 tensor of a dense call, or empty, got ",
              a.seqused_k.scalar_type(), " of shape ", a.seqused_k.sizes());
  TORCH_CHECK(a.page_size >= 0, "page_size must be >= 0 (0: not paged), got ", a.page_size);
  if (paged) {
    TORCH_CHECK(!varlen && a.seqused_k.size(0) == batch, "a paged cache needs a dense call with seqused_k");
    TORCH_CHECK(k.size(2) >= a.page_size && k.size(2) % a.page_size == 0,
                "paged k / v must hold whole pages of page_size rows, got ", k.size(2), " rows, page_size ",
                a.page_size);
    TORCH_CHECK(a.block_table.scalar_type() == at::kLong && a.block_table.dim() == 2 &&
                    a.block_table.size(0) == batch && a.block_table.is_contiguous(),
                "block_table must be a contiguous (B, max_pages) int64 tensor, got ", a.block_table.scalar_type(),
                " of shape ", a.block_table.sizes());
  }
  for (const auto& [name, t] : {std::pair{"seqused_k", &a.seqused_k}, std::pair{"block_table", &a.block_table}}) {
    TORCH_CHECK(t->numel() == 0 || t->device() == q.device(), name, " must be on q's device ", q.device());
  }
  for (const auto& [name, off] : {std::pair{"q_offset", &a.q_offset}, std::pair{"k_offset", &a.k_offset}}) {
    TORCH_CHECK(off->scalar_type() == at::kLong && off->dim() == 1 && off->size(0) == batch && off->is_contiguous(),
                name, " must be a contiguous (", varlen ? "S" : "B", ",) = (", batch, ",) int64 tensor, got ",
                off->scalar_type(), " of shape ", off->sizes());
  }
  TORCH_CHECK(a.slopes.scalar_type() == at::kFloat && a.slopes.dim() == 2 && a.slopes.size(0) == batch &&
                  a.slopes.size(1) == q.size(1),
              "slopes must be a (", varlen ? "S" : "B", ", Hq) = (", batch, ", ", q.size(1), ") float32 tensor, got ",
              a.slopes.scalar_type(), " of shape ", a.slopes.sizes());
  TORCH_CHECK(a.inv_freq.scalar_type() == at::kFloat && a.inv_freq.is_contiguous(), "inv_freq must be contiguous fp32");
  if (a.pos == static_cast<int64_t>(PosKind::kRope)) {
    TORCH_CHECK(a.rotary_dim > 0 && a.rotary_dim % 2 == 0 && a.rotary_dim <= q.size(3),
                "rotary_dim must be even, <= D");
    TORCH_CHECK(a.inv_freq.numel() == a.rotary_dim / 2, "inv_freq must have rotary_dim / 2 entries");
  }
  TORCH_CHECK(a.rel_bias.scalar_type() == at::kFloat, "rel_bias must be float32");
  if (a.pos == static_cast<int64_t>(PosKind::kRelative)) {
    TORCH_CHECK(a.max_distance >= 1, "max_distance must be >= 1");
    TORCH_CHECK(a.rel_bias.is_contiguous() && a.rel_bias.dim() == 3 && a.rel_bias.size(0) == q.size(1) &&
                    a.rel_bias.size(1) == 2 && a.rel_bias.size(2) == a.max_distance + 1,
                "rel_bias must be a contiguous (Hq, 2, max_distance + 1) float32 tensor");
  }
  TORCH_CHECK(a.window >= 0, "window must be >= 0 (0: none)");

  AttentionParams p;
  p.batch = batch;
  p.heads_q = q.size(1);
  p.heads_kv = k.size(1);
  p.seq_q = q.size(2);
  p.seq_k = k.size(2);
  p.head_dim = q.size(3);
  fill_call_args(p, a);
  return p;
}

// The backward's own checks: grad_out and out like q, lse (B, Hq, Nq) contiguous in lse_dtype, grad_lse (the
// gradient of lse, optional) like lse.
void check_backward_inputs(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
                           const at::Tensor& out, const at::Tensor& lse, at::ScalarType lse_dtype) {
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "grad_out and out must have q's shape");
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "grad_out and out must have q's dtype");
  TORCH_CHECK(lse.scalar_type() == lse_dtype && lse.is_contiguous() && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                  lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "lse must be a contiguous (B, Hq, Nq) ", lse_dtype, " tensor");
  if (grad_lse.has_value()) {
    TORCH_CHECK(grad_lse->scalar_type() == lse_dtype && grad_lse->is_contiguous() && grad_lse->sizes() == lse.sizes(),
                "grad_lse must be a contiguous (B, Hq, Nq) ", lse_dtype, " tensor like lse");
  }
}

// KV-cache calls (seqused_k, pages) are forward only: no backward kernel reads them.
void check_forward_only(const AttentionParams& p) {
  TORCH_CHECK(!p.has_seqused_k && !p.paged(), "seqused_k and paged caches are forward only (no backward)");
}

// The relative table's gradient (Hq, 2, max_distance + 1) fp32 on q's device, which the backward kernels fill when
// the table needs a gradient (pos relative and rel_grad); otherwise empty, and the kernels skip that work.
at::Tensor d_rel_bias_output(const AttentionParams& p, bool rel_grad, const at::Tensor& q) {
  const bool table_grad = rel_grad && p.pos == PosKind::kRelative;
  return table_grad ? at::empty({p.heads_q, 2, p.max_distance + 1}, q.options().dtype(at::kFloat))
                    : at::empty({0}, q.options().dtype(at::kFloat));
}

// LSE's dtype for inputs of q's dtype: fp32, fp64 for fp64 (CPU).
at::ScalarType lse_dtype_of(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v FPA_CALL_PARAMS) {
  return cpu::attention_forward(q, k, v, make_params(q, k, v, FPA_OP_CALL_ARGS));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, bool rel_grad FPA_CALL_PARAMS) {
  const AttentionParams p = make_params(q, k, v, FPA_OP_CALL_ARGS);
  check_forward_only(p);
  check_backward_inputs(grad_out, grad_lse, q, out, lse, lse_dtype_of(q));
  return cpu::attention_backward(grad_out, grad_lse, q, k, v, out, lse, d_rel_bias_output(p, rel_grad, q), p);
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

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v FPA_CALL_PARAMS) {
  check_same_cuda_device(q, {{"k", &k}, {"v", &v}, {"q_offset", &q_offset}, {"k_offset", &k_offset},
                             {"cu_seqlens_q", &cu_seqlens_q}, {"cu_seqlens_k", &cu_seqlens_k}, {"slopes", &slopes},
                             {"inv_freq", &inv_freq}, {"rel_bias", &rel_bias}, {"seqused_k", &seqused_k},
                             {"block_table", &block_table}});
  const gpu::DType dtype = cuda_dtype(q);
  const AttentionParams p = make_params(q, k, v, FPA_OP_CALL_ARGS);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = output_like(q);
  at::Tensor lse = at::empty({q.size(0), p.heads_q, p.seq_q}, q.options().dtype(at::kFloat));
  // Decode shapes: split-KV over the device's SMs, with the splits' partial results in fp32 scratch.
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, q.get_device()));
  const gpu::DecodePlan plan = gpu::decode_plan(p, sm_count);
  const int64_t split_rows = gpu::split_rows(p, plan);
  at::Tensor out_partial, lse_partial;  // allocated only for a split plan
  gpu::ForwardWorkspace ws;
  if (split_rows > 0) {
    out_partial = at::empty({split_rows, p.head_dim}, lse.options());
    lse_partial = at::empty({split_rows}, lse.options());
    ws = {out_partial.data_ptr<float>(), lse_partial.data_ptr<float>()};
  }
  run_cuda([&] {
    return gpu::attention_forward(p, dtype, tensor4(q, "q"), tensor4(k, "k"), tensor4(v, "v"), tensor4(out, "out"),
                                  lse.data_ptr<float>(), plan, ws, c10::cuda::getCurrentCUDAStream().stream());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, bool rel_grad FPA_CALL_PARAMS) {
  const at::Tensor no_grad_lse;
  check_same_cuda_device(q, {{"grad_out", &grad_out}, {"grad_lse", grad_lse ? &*grad_lse : &no_grad_lse},
                             {"k", &k}, {"v", &v}, {"out", &out}, {"lse", &lse}, {"q_offset", &q_offset},
                             {"k_offset", &k_offset}, {"cu_seqlens_q", &cu_seqlens_q}, {"cu_seqlens_k", &cu_seqlens_k},
                             {"slopes", &slopes}, {"inv_freq", &inv_freq},
                             {"rel_bias", &rel_bias}});
  const gpu::DType dtype = cuda_dtype(q);
  const AttentionParams p = make_params(q, k, v, FPA_OP_CALL_ARGS);
  check_forward_only(p);
  check_backward_inputs(grad_out, grad_lse, q, out, lse, at::kFloat);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = output_like(q), dk = output_like(k), dv = output_like(v);
  at::Tensor d_rel_bias = d_rel_bias_output(p, rel_grad, q);
  at::Tensor dq_accum = at::empty({q.size(0), p.heads_q, p.seq_q, p.head_dim}, q.options().dtype(at::kFloat));
  at::Tensor delta = at::empty({q.size(0), p.heads_q, p.seq_q}, q.options().dtype(at::kFloat));
  at::Tensor d_rel_partial = at::empty({gpu::rel_partial_floats(p, d_rel_bias.numel() > 0)}, delta.options());
  const gpu::BackwardWorkspace ws{dq_accum.data_ptr<float>(), delta.data_ptr<float>(),
                                  d_rel_partial.numel() ? d_rel_partial.data_ptr<float>() : nullptr};
  const float* grad_lse_data = grad_lse ? grad_lse->data_ptr<float>() : nullptr;
  run_cuda([&] {
    return gpu::attention_backward(p, dtype, tensor4(grad_out, "grad_out"), grad_lse_data, tensor4(q, "q"), tensor4(k, "k"), tensor4(v, "v"), tensor4(out, "out"),
                                   lse.data_ptr<float>(), tensor4(dq, "dq"), tensor4(dk, "dk"), tensor4(dv, "dv"),
                                   d_rel_bias.numel() ? d_rel_bias.data_ptr<float>() : nullptr, ws,
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

// PosKind's codes by name (position.h's FPA_POS_KINDS), for the test that the Python table agrees.
std::tuple<std::vector<std::string>, std::vector<int64_t>> scheme_codes() {
  std::vector<std::string> names;
  std::vector<int64_t> codes;
#define FPA_LIST_POS_KIND(name, enumerator, code)  \
  names.emplace_back(#name);                       \
  codes.push_back(static_cast<int64_t>(PosKind::enumerator));
  FPA_POS_KINDS(FPA_LIST_POS_KIND)
#undef FPA_LIST_POS_KIND
  return {names, codes};
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
  m.def("scheme_codes() -> (str[] names, int[] codes)", &fused_pos_attn::scheme_codes);
  m.def("attention_forward(Tensor q, Tensor k, Tensor v" FPA_CALL_SCHEMA ") -> (Tensor out, Tensor lse)");
  // grad_lse: the gradient of lse (None: zero). rel_grad: whether the relative table needs a gradient (else
  // d_rel_bias is empty and the kernels skip that work).
  m.def("attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "bool rel_grad" FPA_CALL_SCHEMA ") -> (Tensor dq, Tensor dk, Tensor dv, Tensor d_rel_bias)");
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
