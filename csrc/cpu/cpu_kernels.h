// CPU attention kernels (tiled FlashAttention-2 forward and backward) on AttentionParams.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "fused_pos_attn/attention_params.h"

namespace fused_pos_attn::cpu {

// q (B, Hq, Nq, D), k / v (B, Hkv, Nk, D), any strides -> out like q, lse (B, Hq, Nq) fp32 (fp64 for fp64).
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const AttentionParams& params);

// Gradients of attention_forward's out: dq like q, dk like k, dv like v, and d_rel_bias
// (Hq, 2, max_distance + 1) fp32 for pos = relative (empty otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  const AttentionParams& params);

}  // namespace fused_pos_attn::cpu
