// Position math shared by the CPU and CUDA kernels: torch-free, __host__ __device__ inline.
// triton_kernels/position.py mirrors it; ../shared/POSITIONS.md is the specification.
//   rel = pq(i) - pk(j): query position minus key position (int64 absolute positions).
//   ALiBi bias is -slope * |rel|, not multiplied by the softmax scale.
//   RoPE rotates column d with its partner column: x'[d] = x[d] * cos + x[partner(d)] * signed_sin.
//   Relative (T5) bias is a lookup by signed distance in a small per-head table (relative_bias_index).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FPA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FPA_HOST_DEVICE inline
#endif

namespace fused_pos_attn {

// The position schemes, X(name, enumerator, code): the one C++ table of scheme codes. Python's is
// fused_pos_attn.triton_kernels.scheme_codes.SCHEME_CODES (name -> code); the op scheme_codes() returns this one
// and tests/test_scheme_codes.py checks that the two agree.
#define FPA_POS_KINDS(X) \
  X(none, kNone, 0)      \
  X(alibi, kAlibi, 1)    \
  X(rope, kRope, 2)      \
  X(relative, kRelative, 3)

#define FPA_POS_ENUMERATOR(name, enumerator, code) enumerator = code,
enum class PosKind : int { FPA_POS_KINDS(FPA_POS_ENUMERATOR) };
#undef FPA_POS_ENUMERATOR

// True when code is one of PosKind's codes.
FPA_HOST_DEVICE bool is_pos_kind(int64_t code) {
#define FPA_POS_CODE_MATCHES(name, enumerator, code_value) code == code_value ||
  return FPA_POS_KINDS(FPA_POS_CODE_MATCHES) false;
#undef FPA_POS_CODE_MATCHES
}

// Relative distances saturate at +-2^30 so tile arithmetic stays in int32 (as in the Triton kernels).
constexpr int64_t kRelClamp = int64_t{1} << 30;

FPA_HOST_DEVICE int64_t clamp_rel(int64_t rel) {
  return rel < -kRelClamp ? -kRelClamp : (rel > kRelClamp ? kRelClamp : rel);
}

// ALiBi bias for rel = pq - pk.
FPA_HOST_DEVICE float alibi_bias(float slope, int64_t rel) {
  const int64_t r = clamp_rel(rel);
  return -slope * static_cast<float>(r < 0 ? -r : r);
}

// Relative bias: per query head a table rel_bias[h] of shape (2, max_distance + 1) holds the bias of
// every distance: row 0 for keys at or before the query (rel >= 0), row 1 for keys after it (rel < 0),
// column min(|rel|, max_distance). T5's buckets are constant beyond max_distance, so the host folds
// bucket and bucket table into this distance table once per call (an exact copy of the reference's
// fp32 bucket formula, whose log rounding at bucket edges differs between libm implementations).
FPA_HOST_DEVICE int64_t relative_bias_index(int64_t rel, int64_t max_distance) {
  const int64_t side = rel < 0 ? 1 : 0;
  const int64_t distance = rel < 0 ? -rel : rel;
  return side * (max_distance + 1) + (distance < max_distance ? distance : max_distance);
}

// Key j visible to query i: causal needs rel >= 0, a left window w needs rel < w (window <= 0: none).
FPA_HOST_DEVICE bool key_visible(int64_t rel, bool causal, int64_t window) {
  return (!causal || rel >= 0) && (window <= 0 || rel < window);
}

// Visible keys of one query row form one interval of key indices [first, last) (clamped to [0, nk)):
// causal gives j <= pq - k_off, a window gives j > pq - k_off - w.
struct KeyInterval {
  int64_t first;
  int64_t last;
};

FPA_HOST_DEVICE KeyInterval visible_keys(int64_t q_pos, int64_t k_offset, int64_t nk, bool causal, int64_t window) {
  const int64_t diag = q_pos - k_offset;  // key index at the same position as the query
  int64_t first = 0, last = nk;
  if (causal) last = diag + 1 < last ? diag + 1 : last;
  if (window > 0) first = diag - window + 1 > 0 ? diag - window + 1 : 0;
  if (last < first) last = first;
  if (first > nk) first = last = nk;
  if (last < 0) first = last = 0;
  return {first, last};
}

// RoPE column layout for head dim index d (rotary_dim r even): rotate-half pairs d with d +- r/2,
// interleaved pairs (2i, 2i+1). Columns >= r pass through (partner = d, sign = 0).
struct RopeColumn {
  int partner;
  int freq_index;  // index into inv_freq (length r/2)
  float sign;      // -1 for the first of a pair, +1 for the second, 0 for pass-through
};

FPA_HOST_DEVICE RopeColumn rope_column(int d, int rotary_dim, bool interleaved) {
  if (d >= rotary_dim) return {d, 0, 0.0f};
  if (interleaved) return {d ^ 1, d / 2, (d % 2 == 0) ? -1.0f : 1.0f};
  const int half = rotary_dim / 2;
  return d < half ? RopeColumn{d + half, d, -1.0f} : RopeColumn{d - half, d - half, 1.0f};
}

// Angle pos * inv_freq, rounded to fp32 exactly as the reference and Hugging Face transformers do.
FPA_HOST_DEVICE float rope_angle(int64_t pos, float inv_freq) {
  return static_cast<float>(pos) * inv_freq;
}

}  // namespace fused_pos_attn
