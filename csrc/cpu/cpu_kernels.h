// CPU attention kernels (tiled FlashAttention-2 forward and backward) on AttentionParams.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "fused_pos_attn/attention_params.h"

namespace fused_pos_attn::cpu {

// q (B, Hq, Nq, D), k / v (B, Hkv, Nk, D), any strides -> out like q, lse (B, Hq, Nq) fp32 (fp64 for fp64).
// Packed (params.varlen()): q (1, Hq, total_q, D), k / v (1, Hkv, total_k, D), lse (1, Hq, total_q); rows that no
// sequence owns (only possible with cu_seqlens not covering the totals, or max_seqlen below a sequence's length)
// are left unwritten, here and in the backward's dq / dk / dv.
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const AttentionParams& params);

// The decode forward (attention_decode.cpp) serves calls with at most kDecodeMaxRows query rows per batch /
// sequence, and every paged call (not fp64): query heads of a GQA group share each key load, keys split across
// threads when B x Hkv is below the thread count, RoPE key tables cached across calls. attention_forward
// dispatches to it.
constexpr int64_t kDecodeMaxRows = 16;
bool uses_decode_path(const at::Tensor& q, const AttentionParams& params);
void attention_decode_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                              at::Tensor& lse, const AttentionParams& params);

// Gradients of attention_forward's out and lse: dq like q, dk like k, dv like v, for grad_out like q and
// grad_lse (B, Hq, Nq) like lse or undefined (zero): delta = rowsum(dO * O) - dLSE. d_rel_bias: the relative
// table's gradient (Hq, 2, max_distance + 1) fp32 to fill when pos is relative, or empty to skip that work;
// it is returned as the fourth tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor d_rel_bias,
    const AttentionParams& params);

}  // namespace fused_pos_attn::cpu
