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
//   cu_seqlens_q, cu_seqlens_k: the packed (varlen) layout, (S + 1,) int64 each: q (1, Hq, total_q, D) and
//     k / v (1, Hkv, total_k, D) hold S sequences, sequence s the query rows cu_seqlens_q[s]:cu_seqlens_q[s + 1]
//     and the key rows cu_seqlens_k[s]:cu_seqlens_k[s + 1]; the call's batch B is then S (offsets, slopes and
//     the grids are per sequence). Empty (0,) tensors for a dense call: AttentionParams::varlen().
//   max_seqlen_q, max_seqlen_k: packed only (0 for dense): the longest sequence, which sizes grids and
//     workspaces; a kernel processes at most that many rows of a sequence.
//   pos: a PosKind code.
//   slopes (B, Hq) fp32, any strides: ALiBi slope of (b, h).
//   inv_freq (rotary_dim / 2,) fp32, rotary_dim, interleaved, attention_factor: RoPE (rotate-half or
//     interleaved pairs; the factor multiplies cos and sin; a double so fp64 calls see the exact value).
//   rel_bias (Hq, 2, max_distance + 1) fp32 contiguous, max_distance: relative bias by signed distance,
//     indexed by relative_bias_index.
//   causal; window: left window, 0 means none; scale: multiplies q.k only (position biases are not scaled).
//   seqused_k (B,) int64, or empty: dense layout only; batch b's keys are its first seqused_k[b] key rows
//     (clamped into [0, Nk]). Forward only (KV caches).
//   block_table (B, max_pages) int64 contiguous, page_size: a paged cache (forward only, dense layout, seqused_k
//     given), or empty and 0: k / v are (1, Hkv, num_pages * page_size, D) and key j of batch b is row
//     key_row(b, j) (page ids clamped into [0, num_pages)).
#define FPA_CALL_ARGS(X)                        \
  X(Tensor, q_offset, const int64_t*)           \
  X(Tensor, k_offset, const int64_t*)           \
  X(Tensor, cu_seqlens_q, const int64_t*)       \
  X(Tensor, cu_seqlens_k, const int64_t*)       \
  X(int, max_seqlen_q, int64_t)                 \
  X(int, max_seqlen_k, int64_t)                 \
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
  X(float, scale, double)                       \
  X(Tensor, seqused_k, const int64_t*)          \
  X(Tensor, block_table, const int64_t*)        \
  X(int, page_size, int64_t)

// A sequence's rows in the tensors: [start, start + len) along N.
struct RowRange {
  int64_t start, len;
};

struct AttentionParams {
  // Shapes: q (B, Hq, Nq, D), k / v (B, Hkv, Nk, D); packed (varlen()): q (1, Hq, total_q, D), k / v
  // (1, Hkv, total_k, D), seq_q / seq_k the totals, and batch the number of sequences S.
  int64_t batch = 0, heads_q = 0, heads_kv = 0, seq_q = 0, seq_k = 0, head_dim = 0;
#define FPA_PARAMS_FIELD(schema_type, name, field_type) field_type name{};
  FPA_CALL_ARGS(FPA_PARAMS_FIELD)
#undef FPA_PARAMS_FIELD
  int64_t slope_stride_b = 0, slope_stride_h = 0;  // element strides of slopes
  bool packed = false;                             // cu_seqlens_q has S + 1 entries (fill_call_args)
  bool has_seqused_k = false;                      // seqused_k has B entries (fill_call_args)
  int64_t max_pages = 0;                           // block_table's columns; 0 when not paged

  int64_t group() const { return heads_q / heads_kv; }
  float slope(int64_t b, int64_t h) const { return slopes[b * slope_stride_b + h * slope_stride_h]; }
  int64_t rel_bias_stride_h() const { return 2 * (max_distance + 1); }

  // Addressing of batch / sequence b, one path for both layouts (the dense call is the special case: every
  // batch owns all Nq / Nk rows of its own tensor batch). Packed ranges are clamped so that no cu_seqlens can
  // address rows outside the tensors: start into [0, total], end into [start, total], and at most max_seqlen
  // rows.
  FPA_HOST_DEVICE bool varlen() const { return packed; }
  // The tensors' batch index of b (0 when packed) and the tensors' batch size.
  FPA_HOST_DEVICE int64_t tensor_batch(int64_t b) const { return packed ? 0 : b; }
  FPA_HOST_DEVICE int64_t tensor_batches() const { return packed ? 1 : batch; }
  FPA_HOST_DEVICE RowRange q_rows(int64_t b) const { return rows_of(cu_seqlens_q, b, seq_q, max_seqlen_q); }
  // Paged: b's keys are its logical rows [0, seqused_k[b]) (key_row maps them to the cache).
  FPA_HOST_DEVICE RowRange k_rows(int64_t b) const {
    RowRange r = paged() ? RowRange{0, max_pages * page_size} : rows_of(cu_seqlens_k, b, seq_k, max_seqlen_k);
    if (has_seqused_k) r.len = bounded(seqused_k[b], r.len);
    return r;
  }
  FPA_HOST_DEVICE int64_t q_start(int64_t b) const { return q_rows(b).start; }
  FPA_HOST_DEVICE int64_t q_len(int64_t b) const { return q_rows(b).len; }
  FPA_HOST_DEVICE int64_t k_start(int64_t b) const { return k_rows(b).start; }
  FPA_HOST_DEVICE int64_t k_len(int64_t b) const { return k_rows(b).len; }
  // Upper bounds of q_len(b) / k_len(b) over b: what grids and per-sequence buffers are sized for.
  FPA_HOST_DEVICE int64_t max_q_len() const { return packed ? bounded(max_seqlen_q, seq_q) : seq_q; }
  FPA_HOST_DEVICE int64_t max_k_len() const {
    return paged() ? max_pages * page_size : packed ? bounded(max_seqlen_k, seq_k) : seq_k;
  }
  // Paged caches: k / v hold num_pages pages of page_size rows in one tensor batch.
  FPA_HOST_DEVICE bool paged() const { return page_size > 0; }
  FPA_HOST_DEVICE int64_t k_tensor_batch(int64_t b) const { return paged() ? 0 : tensor_batch(b); }
  // The k / v row (along N of tensor batch k_tensor_batch(b)) of b's key j, 0 <= j < k_len(b).
  FPA_HOST_DEVICE int64_t key_row(int64_t b, int64_t j) const {
    if (!paged()) return k_start(b) + j;
    const int64_t page = bounded(block_table[b * max_pages + j / page_size], seq_k / page_size - 1);
    return page * page_size + j % page_size;
  }
  // Rows of the (B, Hq, Nq) LSE (and of every per-query-row workspace): tensor batches x Hq x Nq.
  FPA_HOST_DEVICE int64_t lse_rows() const { return tensor_batches() * heads_q * seq_q; }
  // The batch / sequence whose rows (q_rows) hold query row `row` (along N) of tensor batch tb, or -1 when
  // none does: tb when dense; packed, a binary search over cu_seqlens_q for the last sequence starting at or
  // before row (exact for valid cu_seqlens; never out of bounds for any).
  FPA_HOST_DEVICE int64_t q_sequence_of(int64_t tb, int64_t row) const {
    if (!packed) return tb;
    if (batch <= 0) return -1;
    int64_t lo = 0, hi = batch;  // the last b in [lo, hi) with q_start(b) <= row
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (q_start(mid) <= row) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    const RowRange r = q_rows(lo);
    return row >= r.start && row < r.start + r.len ? lo : -1;
  }

 private:
  FPA_HOST_DEVICE static int64_t bounded(int64_t x, int64_t hi) { return x < 0 ? 0 : (x < hi ? x : hi); }
  FPA_HOST_DEVICE RowRange rows_of(const int64_t* cu_seqlens, int64_t b, int64_t total, int64_t max_len) const {
    if (!packed) return {0, total};
    const int64_t start = bounded(cu_seqlens[b], total);
    const int64_t end = cu_seqlens[b + 1] < start ? start : bounded(cu_seqlens[b + 1], total);
    return {start, bounded(max_len, end - start)};
  }
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

// Fills p's FPA_CALL_ARGS fields (and the slope strides, the layout) from args, an object with one member per
// entry named like it (tensors as data_ptr<T>() / stride(i) / size(i) providers). Shapes are the caller's.
// A packed call (cu_seqlens_q with S + 1 >= 1 entries) also sets batch to S: call it after the shapes.
template <typename CallArgs>
void fill_call_args(AttentionParams& p, const CallArgs& args) {
#define FPA_ASSIGN_CALL_ARG(schema_type, name, field_type) detail::assign_call_arg(p.name, args.name);
  FPA_CALL_ARGS(FPA_ASSIGN_CALL_ARG)
#undef FPA_ASSIGN_CALL_ARG
  p.slope_stride_b = args.slopes.stride(0);
  p.slope_stride_h = args.slopes.stride(1);
  p.packed = args.cu_seqlens_q.size(0) > 0;
  if (p.packed) p.batch = args.cu_seqlens_q.size(0) - 1;
  p.has_seqused_k = args.seqused_k.size(0) > 0;
  p.max_pages = p.paged() ? args.block_table.size(1) : 0;
}

}  // namespace fused_pos_attn
