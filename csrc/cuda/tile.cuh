// Shared-memory tiles of the CUDA kernels: loading rows of a (N, D) head slice, and RoPE applied to a tile
// as it is loaded (q / k are rotated in shared memory, never in global memory). Position math comes from
// position.h only.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/launch.h"
#include "cuda/mma.cuh"
#include "fused_pos_attn/attention_params.h"

namespace fused_pos_attn::gpu {

constexpr int kThreads = 128;  // 4 warps per block in every tiled kernel

// Rows [0, kRows) of a shared tile (row stride kStride) from base + row_offset(r), row_offset(r) an element offset
// (int64) of row r's first column (unit column stride), or -1 for a row to zero-fill (so padded keys give finite
// scores and zero values). vec16: 16-byte cp.async (the caller commits and waits), else element copies through
// registers (complete when the function returns; the caller's barrier publishes them).
template <typename T, int kRows, int kHeadDim, int kStride, typename RowOffset>
__device__ __forceinline__ void load_rows(T* tile, const T* base, RowOffset row_offset, bool vec16) {
  if (vec16) {
    constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      const int64_t offset = row_offset(r);
      cp_async_16(tile + r * kStride + col, offset >= 0 ? base + offset + col : base, offset >= 0);
    }
  } else {
    for (int e = threadIdx.x; e < kRows * kHeadDim; e += kThreads) {
      const int r = e / kHeadDim, col = e % kHeadDim;
      const int64_t offset = row_offset(r);
      tile[r * kStride + col] = offset >= 0 ? base[offset + col] : from_float<T>(0.0f);
    }
  }
}

// Rows [row0, row0 + kRows) of a head slice (row stride stride_n elements) into a shared tile, rows at or beyond
// num_rows zero-filled (load_rows).
template <typename T, int kRows, int kHeadDim, int kStride>
__device__ __forceinline__ void load_tile(T* tile, const T* head, int64_t stride_n, int row0, int num_rows,
                                          bool vec16) {
  load_rows<T, kRows, kHeadDim, kStride>(
      tile, head, [=](int r) { return row0 + r < num_rows ? (row0 + r) * stride_n : int64_t{-1}; }, vec16);
}

// cos and sin (attention factor folded in) of column d's rotation at absolute position pos.
__device__ __forceinline__ void rope_cos_sin(const AttentionParams& p, const RopeColumn& col, int64_t pos,
                                             float& cos_a, float& sin_a) {
  sincosf(rope_angle(pos, __ldg(p.inv_freq + col.freq_index)), &sin_a, &cos_a);
  const float factor = static_cast<float>(p.attention_factor);
  cos_a *= factor;
  sin_a *= factor;
}

// Rotate rows [0, kRows) of a shared tile in place, row r at absolute position pos0 + r / rows_per_position
// (rows_per_position > 1: consecutive rows of one position, a decode tile's query heads):
// x'[d] = x[d] cos + x[partner(d)] sign(d) sin (position.h's rope_column). One work item per rotation pair,
// so no two threads touch the same element; the caller puts barriers before and after.
template <typename T, int kRows, int kStride>
__device__ __forceinline__ void rope_rotate_tile(T* tile, int64_t pos0, const AttentionParams& p,
                                                 int rows_per_position = 1) {
  const int pairs = p.rotary_dim / 2;
  for (int item = threadIdx.x; item < kRows * pairs; item += kThreads) {
    const int r = item / pairs, pair = item % pairs;
    const int d = p.interleaved ? 2 * pair : pair;  // the pair's first column (sign -1)
    const RopeColumn first = rope_column(d, p.rotary_dim, p.interleaved);
    const RopeColumn second = rope_column(first.partner, p.rotary_dim, p.interleaved);
    float cos_a, sin_a;
    rope_cos_sin(p, first, pos0 + r / rows_per_position, cos_a, sin_a);
    T* x = tile + r * kStride;
    const float x1 = to_float(x[d]), x2 = to_float(x[first.partner]);
    x[d] = from_float<T>(x1 * cos_a + first.sign * sin_a * x2);
    x[first.partner] = from_float<T>(x2 * cos_a + second.sign * sin_a * x1);
  }
}

// Column d of a gradient row w.r.t. the rotated row, mapped back through the transposed rotation
// (angle -> -angle): g[d] cos - g[partner(d)] sign(d) sin. x is g[d], x_partner is g[partner(d)].
__device__ __forceinline__ float rope_rotate_back(float x, float x_partner, const RopeColumn& col, int64_t pos,
                                                  const AttentionParams& p) {
  float cos_a, sin_a;
  rope_cos_sin(p, col, pos, cos_a, sin_a);
  return x * cos_a - col.sign * sin_a * x_partner;
}

// Host side: whether a tensor's tiles can be copied with 16-byte cp.async (see Tensor4).
inline bool allows_cp_async(const Tensor4& t) {
  return reinterpret_cast<uintptr_t>(t.data) % 16 == 0 && t.stride_b % 8 == 0 && t.stride_h % 8 == 0 &&
         t.stride_n % 8 == 0;
}

// Host side: grids put query (or key / value) heads on y and the batch (packed: the sequences) on z; row indices
// are int32.
inline void check_grid(const AttentionParams& p) {
  if (p.heads_q > 65535 || p.batch > 65535) {
    throw std::invalid_argument(std::string("fused_pos_attn CUDA kernels: ") +
                                (p.varlen() ? "sequences" : "batch") +
                                " and query heads must be <= 65535 each, got " + (p.varlen() ? "S=" : "B=") +
                                std::to_string(p.batch) + ", Hq=" + std::to_string(p.heads_q));
  }
  constexpr int64_t kMaxSeq = (int64_t{1} << 31) - 256;
  if (p.seq_q > kMaxSeq || p.seq_k > kMaxSeq || p.max_k_len() > kMaxSeq) {  // paged: max_pages x page_size keys
    throw std::invalid_argument("fused_pos_attn CUDA kernels: Nq and Nk (a paged cache's max_pages x page_size) "
                                "must be < 2^31 - 256, got Nq=" + std::to_string(p.seq_q) + ", Nk=" +
                                std::to_string(p.paged() ? p.max_k_len() : p.seq_k));
  }
}

}  // namespace fused_pos_attn::gpu
