// Scalars and small vectors of one attention call, as every native kernel takes them (torch-free).
#pragma once

#include <cstdint>

#include "fused_pos_attn/position.h"

namespace fused_pos_attn {

struct AttentionParams {
  // Shapes: q (B, Hq, Nq, D), k / v (B, Hkv, Nk, D).
  int64_t batch = 0, heads_q = 0, heads_kv = 0, seq_q = 0, seq_k = 0, head_dim = 0;
  // Absolute positions: query row i of batch b sits at q_offset[b] + i, key j at k_offset[b] + j.
  const int64_t* q_offset = nullptr;  // (B,)
  const int64_t* k_offset = nullptr;  // (B,)
  PosKind pos = PosKind::kNone;
  // ALiBi: slope of (b, h) at slopes[b * slope_stride_b + h * slope_stride_h].
  const float* slopes = nullptr;
  int64_t slope_stride_b = 0, slope_stride_h = 0;
  // RoPE: inv_freq (rotary_dim / 2,), rotate-half or interleaved pairs, factor on cos and sin.
  const float* inv_freq = nullptr;
  int rotary_dim = 0;
  bool interleaved = false;
  double attention_factor = 1.0;  // double so fp64 calls (gradcheck) see the exact value; kernels narrow it
  // Relative: rel_bias (Hq, 2, max_distance + 1) contiguous fp32, indexed by relative_bias_index.
  const float* rel_bias = nullptr;
  int64_t max_distance = 0;
  bool causal = false;
  int64_t window = 0;  // left window; 0 means none
  double scale = 1.0;  // multiplies q.k only; position biases are not scaled

  int64_t group() const { return heads_q / heads_kv; }
  float slope(int64_t b, int64_t h) const { return slopes[b * slope_stride_b + h * slope_stride_h]; }
  int64_t rel_bias_stride_h() const { return 2 * (max_distance + 1); }
};

}  // namespace fused_pos_attn
