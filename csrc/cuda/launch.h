// Launchers of the CUDA attention kernels (attention_forward.cu, attention_backward.cu). Torch-free: tensors
// arrive as raw pointers with element strides, the call's scalars and small vectors as AttentionParams
// (its pointers are device pointers). Kernels exist for fp16 / bf16 and head dims 64 / 128 (sm_80+);
// anything else throws std::invalid_argument before a launch.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "fused_pos_attn/attention_params.h"

namespace fused_pos_attn::gpu {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// A (B, H, N, D) tensor with unit stride along D; strides in elements, any values (a (B, N, H, D) tensor
// viewed as (B, H, N, D) is read in place). Packed sequences (AttentionParams::varlen()): (1, H, total, D), a
// view of a (total, H, D) tensor, each sequence's rows located by AttentionParams::q_rows / k_rows. Tiles are
// copied with 16-byte cp.async when the base pointer is 16-byte aligned and every stride is a multiple of 8
// elements, element by element otherwise.
struct Tensor4 {
  void* data = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_n = 0;
};

constexpr bool supported_head_dim(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

constexpr int kForwardBlockM = 64;  // query-tile rows of a forward block (4 warps x 16)

// Split-KV decoding. A forward whose batches / sequences have at most kMaxDecodeRows query rows puts `group` query
// heads of one kv head in each block (group x query rows share the kForwardBlockM tile rows and every K / V load)
// and splits the keys each block sees `splits` ways (equal runs of whole key blocks) over blocks of their own; each
// split writes a partial (out, LSE) and a second kernel merges them. Not a decode shape: group 1, splits 1 (the
// plain forward).
constexpr int64_t kMaxDecodeRows = 16;
constexpr int kDecodeWaves = 2;           // blocks per SM a split plan aims for
constexpr int64_t kMinSplitKeys = 256;    // keys each split keeps at least

struct DecodePlan {
  int group = 1;   // query heads per block: a divisor of Hq / Hkv
  int splits = 1;  // key splits per (query block, head group, batch)
};

// The plan of a forward on a device with sm_count SMs: group the largest divisor of Hq / Hkv whose rows fit the
// tile, splits enough blocks for kDecodeWaves per SM, each split keeping min_split_keys keys.
inline DecodePlan decode_plan(const AttentionParams& p, int sm_count, int64_t min_split_keys = kMinSplitKeys) {
  const int64_t rows_q = p.max_q_len();
  if (rows_q == 0 || rows_q > kMaxDecodeRows) return {};
  DecodePlan plan;
  for (int64_t d = 1; d <= p.group(); ++d) {
    if (p.group() % d == 0 && d * rows_q <= kForwardBlockM) plan.group = static_cast<int>(d);
  }
  const int64_t blocks = p.batch * (p.heads_q / plan.group);
  const int64_t wanted = (int64_t{kDecodeWaves} * sm_count + blocks - 1) / std::max<int64_t>(blocks, 1);
  plan.splits = static_cast<int>(std::max<int64_t>(1, std::min(wanted, p.max_k_len() / min_split_keys)));
  return plan;
}

// Scratch of a split forward (plan.splits > 1), device memory the caller allocates (uninitialized): per split,
// every LSE row's partial out and LSE, split s of LSE row i at s * p.lse_rows() + i. Sizes: split_rows(p, plan)
// floats for lse_partial, times the head dim for out_partial; null when not split.
struct ForwardWorkspace {
  float* out_partial = nullptr;  // (splits, lse rows, D) fp32, each split's out normalized by its own sum
  float* lse_partial = nullptr;  // (splits, lse rows) fp32, -inf where the split saw no key
};

inline int64_t split_rows(const AttentionParams& p, const DecodePlan& plan) {
  return plan.splits > 1 ? plan.splits * p.lse_rows() : 0;
}

// out (B, Hq, Nq, D) in q's dtype (stride_n and stride_h even, as torch allocates it), lse (B, Hq, Nq) fp32
// contiguous ((1, Hq, total_q) packed): natural-log LSE of each row's scores, -inf (and out 0) for a row with no
// visible key. Packed: rows outside every sequence (or past max_seqlen_q) are not written. plan: decode_plan's
// (or the default, the plain forward); ws: its workspace.
cudaError_t attention_forward(const AttentionParams& p, DType dtype, const Tensor4& q, const Tensor4& k,
                              const Tensor4& v, const Tensor4& out, float* lse, const DecodePlan& plan,
                              const ForwardWorkspace& ws, cudaStream_t stream);

constexpr int kBackwardBlockN = 64;  // keys per block of the backward's dK / dV kernel

// The backward keeps the relative table's gradient row (2 * (max_distance + 1) fp32) of each dK / dV block in
// shared memory, written once per (block, query head) and reduced in a fixed order (deterministic), when the row
// has at most kMaxSharedRelEntries entries; larger tables take fp32 atomics instead.
constexpr int64_t kMaxSharedRelEntries = 1024;

inline bool rel_table_in_shared_memory(const AttentionParams& p) {
  return p.pos == PosKind::kRelative && p.rel_bias_stride_h() <= kMaxSharedRelEntries;
}

// Size of BackwardWorkspace::d_rel_partial: (B, key blocks, Hq, 2 * (max_distance + 1)) fp32 when the table needs
// a gradient (table_grad) and its rows fit shared memory, else 0. Packed: B is the number of sequences and the key
// blocks those of the longest one (max_seqlen_k).
inline int64_t rel_partial_floats(const AttentionParams& p, bool table_grad) {
  if (!table_grad || !rel_table_in_shared_memory(p)) return 0;
  return p.batch * ((p.max_k_len() + kBackwardBlockN - 1) / kBackwardBlockN) * p.heads_q * p.rel_bias_stride_h();
}

// Scratch of the backward, device memory the caller allocates; the launcher initializes it.
struct BackwardWorkspace {
  float* dq_accum = nullptr;  // like q, (B, Hq, Nq, D) fp32: dQ of the rotated q, summed by atomics over key blocks
  float* delta = nullptr;     // like lse, (B, Hq, Nq) fp32: rowsum(dO * O) - dLSE
  float* d_rel_partial = nullptr;  // rel_partial_floats(p, d_rel_bias != null) fp32, or null when that is 0
};

// FlashAttention-2 backward: preprocess (delta), one dK/dV kernel per key block that also adds its share of
// dQ into ws.dq_accum with fp32 atomics, then a kernel turning dq_accum into dq (scale, RoPE rotated back,
// cast). dk / dv like k / v, dq like q (even stride_n / stride_h). grad_lse: the gradient of lse, (B, Hq, Nq)
// fp32 contiguous, or null (zero). d_rel_bias: (Hq, 2, max_distance + 1) fp32, written here when p.pos is
// relative (from per-block partial rows in ws.d_rel_partial, or with atomics for large tables); null skips the
// table gradient. lse as forward. Packed: dq is 0 on rows outside every sequence, dk / dv are not written there.
cudaError_t attention_backward(const AttentionParams& p, DType dtype, const Tensor4& grad_out, const float* grad_lse,
                               const Tensor4& q, const Tensor4& k, const Tensor4& v, const Tensor4& out,
                               const float* lse,
                               const Tensor4& dq, const Tensor4& dk, const Tensor4& dv, float* d_rel_bias,
                               const BackwardWorkspace& ws, cudaStream_t stream);

}  // namespace fused_pos_attn::gpu
