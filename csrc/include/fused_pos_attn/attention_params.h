// Scalars and small vectors of one attention call, as every native kernel takes them (torch-free).
#pragma once

#include <cstdint>
#include <type_traits>

#include "fused_pos_attn/position.h"

namespace fused_pos_attn {

// The per-call position and masking arguments, X(schema_type, name, field_type), in schema order: the ONE
// place they are listed in C++. From it come the ops' schema and C++ signatures (csrc/ops.cpp), the
// AttentionParams fields below and their filling (fill_call_args); Python builds them by name, in one place
// (fused_pos_attn/backends/native.py, op_args). A new per-call scalar is one line here.
//   q_offset, k_offset (B,) int64: query row i of batch b sits at q_offset[b] + i, key j at k_offset[b] + j.
//   pos: a PosKind code.
//   slopes (B, Hq) fp32, any strides: ALiBi slope of (b, h).
//   inv_freq (rotary_dim / 2,) fp32, rotary_dim, interleaved, attention_factor: RoPE (rotate-half or
//     interleaved pairs; the factor multiplies cos and sin; a double so fp64 calls see the exact value).
//   rel_bias (Hq, 2, max_distance + 1) fp32 contiguous, max_distance: relative bias by signed distance,
//     indexed by relative_bias_index.
//   causal; window: left window, 0 means none; scale: multiplies q.k only (position biases are not scaled).
#define FPA_CALL_ARGS(X)                        \
  X(Tensor, q_offset, const int64_t*)           \
  X(Tensor, k_offset, const int64_t*)           \
  X(int, pos, PosKind)                          \
  X(Tensor, slopes, const float*)               \
  X(Tensor, inv_freq, const float*)             \
  X(int, rotary_dim, int)                       \
  X(bool, interleaved, bool)                    \
  X(float, attention_factor, double)            \
  X(Tensor, rel_bias, const float*)             \
  X(int, max_distance, int64_t)                 \
  X(bool, causal, bool)                         \
  X(int, window, int64_t)                       \
  X(float, scale, double)

struct AttentionParams {
  // Shapes: q (B, Hq, Nq, D), k / v (B, Hkv, Nk, D).
  int64_t batch = 0, heads_q = 0, heads_kv = 0, seq_q = 0, seq_k = 0, head_dim = 0;
#define FPA_PARAMS_FIELD(schema_type, name, field_type) field_type name{};
  FPA_CALL_ARGS(FPA_PARAMS_FIELD)
#undef FPA_PARAMS_FIELD
  int64_t slope_stride_b = 0, slope_stride_h = 0;  // element strides of slopes

  int64_t group() const { return heads_q / heads_kv; }
  float slope(int64_t b, int64_t h) const { return slopes[b * slope_stride_b + h * slope_stride_h]; }
  int64_t rel_bias_stride_h() const { return 2 * (max_distance + 1); }
};

namespace detail {
// A pointer field takes a tensor's data pointer (anything with data_ptr<T>(): at::Tensor, or the CUDA
// emulation's host tensor), any other field a converted scalar.
template <typename Field, typename Value>
void assign_call_arg(Field& field, const Value& value) {
  if constexpr (std::is_pointer_v<Field>) {
    field = value.template data_ptr<std::remove_const_t<std::remove_pointer_t<Field>>>();
  } else {
    field = static_cast<Field>(value);
  }
}
}  // namespace detail

// Fills p's FPA_CALL_ARGS fields (and the slope strides) from args, an object with one member per entry
// named like it (tensors as data_ptr<T>() / stride(i) providers). Shapes are the caller's.
template <typename CallArgs>
void fill_call_args(AttentionParams& p, const CallArgs& args) {
#define FPA_ASSIGN_CALL_ARG(schema_type, name, field_type) detail::assign_call_arg(p.name, args.name);
  FPA_CALL_ARGS(FPA_ASSIGN_CALL_ARG)
#undef FPA_ASSIGN_CALL_ARG
  p.slope_stride_b = args.slopes.stride(0);
  p.slope_stride_h = args.slopes.stride(1);
}

}  // namespace fused_pos_attn
