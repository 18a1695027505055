// CUDA attention forward kernel (FlashAttention-2): one block of 4 warps per (64 query rows, query head, batch or
// packed sequence; blocks past a sequence's rows exit at once); a decode plan (launch.h) instead gives a block
// `group` query heads of one kv head (tile row r: query m0 + r / group of head h0 + r % group) and one of `splits`
// key ranges, whose partial (out, LSE) attention_split_merge_kernel combines;
// each warp owns 16 rows and runs the online softmax over the key blocks its rows can see, with tensor-core
// mma.sync for S = Q K^T and O += P V. Position math is applied where the data already is: RoPE rotates the
// q / k tiles in shared memory as they are loaded, ALiBi / relative biases and the causal-window mask are
// added to the fp32 accumulators in registers (each lane knows the (row, column) of its elements, mma.cuh).
// Scores live in the log2 domain (exp2); the LSE written out is natural-log.
//
// Keys: per-row counts (seqused_k) and paged caches map through AttentionParams::key_row.
//
// Pipeline per key block j: cp.async V_j -> S = Q K_j^T -> mask / bias / online softmax -> cp.async K_{j+1}
// (overlaps P V_j) -> O += P V_j. Q is kept in registers (its shared buffer is then reused for V).
#pragma once

#include <cmath>

#include "cuda/launch.h"
#include "cuda/mma.cuh"
#include "cuda/tile.cuh"

namespace fused_pos_attn::gpu {

template <int kHeadDim>
struct ForwardConfig {
  static constexpr int kBlockM = kForwardBlockM;  // tile rows per block: 4 warps x 16
  static constexpr int kBlockN = 64;              // keys per step
  static constexpr int kStride = kHeadDim + 8;  // shared row stride: 16 bytes of padding keep ldmatrix conflict-free
  template <typename T>
  static constexpr int smem_bytes() {
    return 2 * kBlockN * kStride * static_cast<int>(sizeof(T));  // K tile, V tile (Q passes through V's)
  }
};

struct ForwardArgs {
  Tensor4 q, k, v, out;
  float* lse;  // (B, Hq, Nq); packed: (1, Hq, total_q)
  bool vec16;  // q, k, v all allow 16-byte cp.async
  DecodePlan plan;
  ForwardWorkspace ws;  // plan.splits > 1: the splits' partial results
};

// The kernels' arguments (shared by the launcher and tests/cuda_emulation).
inline ForwardArgs forward_args(const AttentionParams& p, const Tensor4& q, const Tensor4& k, const Tensor4& v,
                                const Tensor4& out, float* lse, const DecodePlan& plan, const ForwardWorkspace& ws) {
  return ForwardArgs{q, k, v, out, lse, allows_cp_async(q) && allows_cp_async(k) && allows_cp_async(v), plan, ws};
}

// The forward's grid: (query blocks of the longest sequence x splits, Hq / group, batch or sequences); empty (a 0
// extent) when there is nothing to compute, which the launcher does not launch.
inline dim3 forward_grid(const AttentionParams& p, const DecodePlan& plan) {
  const int64_t queries_per_block = kForwardBlockM / plan.group;
  return dim3(static_cast<unsigned>((p.max_q_len() + queries_per_block - 1) / queries_per_block * plan.splits),
              static_cast<unsigned>(p.heads_q / plan.group), static_cast<unsigned>(p.batch));
}

// The merge's grid: one warp per LSE row.
inline dim3 merge_grid(const AttentionParams& p) {
  constexpr int kRowsPerBlock = kThreads / kWarpSize;
  return dim3(static_cast<unsigned>((p.lse_rows() + kRowsPerBlock - 1) / kRowsPerBlock));
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(const __grid_constant__ AttentionParams p, const __grid_constant__ ForwardArgs args) {
  using Cfg = ForwardConfig<kHeadDim>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStride = Cfg::kStride;
  constexpr int kDSteps = kHeadDim / 16;  // k-steps of Q K^T
  constexpr int kNTiles = kBlockN / 8;    // n8 tiles of S (per warp: 16 x kBlockN)
  constexpr int kDTiles = kHeadDim / 8;   // n8 tiles of O (per warp: 16 x kHeadDim)

  extern __shared__ __align__(16) unsigned char smem[];
  T* s_k = reinterpret_cast<T*>(smem);
  T* s_v = s_k + kBlockN * kStride;
  T* s_q = s_v;

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, g = lane / 4, t = lane % 4;
  const int group = args.plan.group, splits = args.plan.splits, split = blockIdx.x % splits;
  const int queries = kBlockM / group;  // query rows of each head in the tile; tile rows past queries * group idle
  const int m0 = blockIdx.x / splits * queries, h0 = blockIdx.y * group, b = blockIdx.z;
  // Batch / sequence b's rows: q rows [q_rows.start, + seq_q) and k / v rows [k_rows.start, + seq_k) of tensor batch
  // tb. Below, row and key indices are b's own (0-based); the head pointers include the starts.
  const RowRange q_rows = p.q_rows(b), k_rows = p.k_rows(b);
  const int seq_q = static_cast<int>(q_rows.len), seq_k = static_cast<int>(k_rows.len);
  if (m0 >= seq_q) return;  // the grid covers the longest sequence
  // Tile row r: query row query_of(r) of head h0 + r % group; seq_q for an idle row (past queries * group).
  const auto query_of = [=](int r) { return r < queries * group ? m0 + r / group : seq_q; };
  const int64_t tb = p.tensor_batch(b);
  const int kv_h = h0 / static_cast<int>(p.heads_q / p.heads_kv);
  const int64_t q_off = p.q_offset[b], k_off = p.k_offset[b];

  // Keys the block sees: those any of its rows sees (interval ends are non-decreasing in the row, position.h
  // visible_keys); split, an equal run of whole key blocks of that range per split (the last runs may be empty).
  const int last_row = min(m0 + queries, seq_q) - 1;
  int n_lo = static_cast<int>(visible_keys(q_off + m0, k_off, seq_k, p.causal, p.window).first);
  int n_hi = static_cast<int>(visible_keys(q_off + last_row, k_off, seq_k, p.causal, p.window).last);
  if (splits > 1 && n_lo < n_hi) {
    const int64_t run = int64_t{kBlockN} * splits;
    const int64_t split_len = (int64_t{n_hi} - n_lo + run - 1) / run * kBlockN;  // whole key blocks
    const int64_t lo = n_lo + split * split_len, hi = lo + split_len;
    n_lo = lo < n_hi ? static_cast<int>(lo) : n_hi;
    n_hi = hi < n_hi ? static_cast<int>(hi) : n_hi;
  }

  // This lane's two rows (C fragment rows g and g + 8 of the warp's 16): query row, head, and visible keys.
  int row[2], head[2], key_first[2], key_last[2];
  int64_t q_pos[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int tile_row = warp * 16 + g + 8 * rr;
    row[rr] = query_of(tile_row);
    head[rr] = h0 + tile_row % group;
    q_pos[rr] = q_off + row[rr];
    const KeyInterval iv = row[rr] < seq_q ? visible_keys(q_pos[rr], k_off, seq_k, p.causal, p.window)
                                           : KeyInterval{0, 0};
    key_first[rr] = iv.first > n_lo ? static_cast<int>(iv.first) : n_lo;
    key_last[rr] = iv.last < n_hi ? static_cast<int>(iv.last) : n_hi;
  }
  // A warp's rows are all idle (past the group's rows or the sequence) iff its first one is.
  const bool warp_active = query_of(warp * 16) < seq_q;

  float o[kDTiles][4] = {};
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};

  if (n_lo < n_hi) {
    const T* q_head = static_cast<const T*>(args.q.data) + tb * args.q.stride_b + h0 * args.q.stride_h +
                      q_rows.start * args.q.stride_n;
    // K / V rows: b's key j at row key_row(b, j) of tensor batch k_tensor_batch(b) (paged), else at k_rows.start + j.
    const int64_t tb_k = p.k_tensor_batch(b);
    const T* k_head = static_cast<const T*>(args.k.data) + tb_k * args.k.stride_b + kv_h * args.k.stride_h +
                      k_rows.start * args.k.stride_n;
    const T* v_head = static_cast<const T*>(args.v.data) + tb_k * args.v.stride_b + kv_h * args.v.stride_h +
                      k_rows.start * args.v.stride_n;
    const bool paged = p.paged();
    auto key_rows = [&](int64_t stride_n, int j0) {
      return [&p, paged, b, seq_k, stride_n, j0](int r) {
        const int j = j0 + r;
        return j >= seq_k ? int64_t{-1} : (paged ? p.key_row(b, j) : j) * stride_n;
      };
    };
    const bool rope = p.pos == PosKind::kRope, alibi = p.pos == PosKind::kAlibi;
    const bool relative = p.pos == PosKind::kRelative;

    const int64_t q_stride_n = args.q.stride_n, q_stride_h = args.q.stride_h;
    load_rows<T, kBlockM, kHeadDim, kStride>(
        s_q, q_head,
        [=](int r) {
          const int query = query_of(r);
          return query < seq_q ? query * q_stride_n + r % group * q_stride_h : int64_t{-1};
        },
        args.vec16);
    load_rows<T, kBlockN, kHeadDim, kStride>(s_k, k_head, key_rows(args.k.stride_n, n_lo), args.vec16);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if (rope) {
      rope_rotate_tile<T, kBlockM, kStride>(s_q, q_off + m0, p, group);
      rope_rotate_tile<T, kBlockN, kStride>(s_k, k_off + n_lo, p);
      __syncthreads();
    }
    uint32_t q_frag[kDSteps][4];
#pragma unroll
    for (int ks = 0; ks < kDSteps; ++ks) load_a(q_frag[ks], s_q, kStride, warp * 16, ks * 16, lane);
    __syncthreads();  // s_q is s_v from here on

    const float scale_log2 = static_cast<float>(p.scale) * kLog2e;  // biases are not scaled
    float slope_log2[2];
    const float* rel_table[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      slope_log2[rr] = alibi ? p.slopes[b * p.slope_stride_b + head[rr] * p.slope_stride_h] * kLog2e : 0.0f;
      rel_table[rr] = relative ? p.rel_bias + head[rr] * 2 * (p.max_distance + 1) : nullptr;
    }

    for (int n0 = n_lo; n0 < n_hi; n0 += kBlockN) {
      load_rows<T, kBlockN, kHeadDim, kStride>(s_v, v_head, key_rows(args.v.stride_n, n0), args.vec16);
      cp_async_commit();

      float s[kNTiles][4] = {};
      if (warp_active) {  // a warp whose rows are all idle skips the math (not the loads and barriers)
#pragma unroll
        for (int ks = 0; ks < kDSteps; ++ks) {
#pragma unroll
          for (int nt = 0; nt < kNTiles; nt += 2) {
            uint32_t kb[4];
            load_b_nk(kb, s_k, kStride, nt * 8, ks * 16, lane);
            mma_16816<T>(s[nt], q_frag[ks], kb[0], kb[1]);
            mma_16816<T>(s[nt + 1], q_frag[ks], kb[2], kb[3]);
          }
        }

        // Scores (log2 units) with bias and mask, then the online softmax of this lane's two rows.
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          // rel = pq - pk of column 0, saturated like position.h (clamp_rel) so per-column math stays in int32.
          const int rel0 = static_cast<int>(clamp_rel(q_pos[rr] - (k_off + n0)));
          float row_max = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int col = nt * 8 + 2 * t + c;
              float bias = 0.0f;
              if (alibi) {
                bias = alibi_bias(slope_log2[rr], rel0 - col);
              } else if (relative) {
                bias = __ldg(rel_table[rr] + relative_bias_index(rel0 - col, p.max_distance)) * kLog2e;
              }
              const bool visible = n0 + col >= key_first[rr] && n0 + col < key_last[rr];
              float& x = s[nt][2 * rr + c];
              x = visible ? x * scale_log2 + bias : -INFINITY;
              row_max = fmaxf(row_max, x);
            }
          }
          const float m_new = fmaxf(m_run[rr], group_max(row_max));
          const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // no visible key yet: keep exp2 away from inf - inf
          const float alpha = exp2f(m_run[rr] - m_use);
          float row_sum = 0.0f;
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              float& x = s[nt][2 * rr + c];
              x = exp2f(x - m_use);
              row_sum += x;
            }
          }
          l_run[rr] = l_run[rr] * alpha + row_sum;  // per-lane partial sum; summed over the group at the end
          m_run[rr] = m_new;
#pragma unroll
          for (int dt = 0; dt < kDTiles; ++dt) {
            o[dt][2 * rr] *= alpha;
            o[dt][2 * rr + 1] *= alpha;
          }
        }
      }

      __syncthreads();  // every warp is done with s_k
      const bool has_next = n0 + kBlockN < n_hi;
      if (has_next) {
        load_rows<T, kBlockN, kHeadDim, kStride>(s_k, k_head, key_rows(args.k.stride_n, n0 + kBlockN), args.vec16);
      }
      cp_async_commit();
      cp_async_wait<1>();  // V_j has landed; K_{j+1} may still be in flight
      __syncthreads();

      if (warp_active) {
#pragma unroll
        for (int ks = 0; ks < kBlockN / 16; ++ks) {
          uint32_t pa[4];
          c_to_a<T>(pa, s[2 * ks], s[2 * ks + 1]);
#pragma unroll
          for (int dt = 0; dt < kDTiles; dt += 2) {
            uint32_t vb[4];
            load_b_kn(vb, s_v, kStride, ks * 16, dt * 8, lane);
            mma_16816<T>(o[dt], pa, vb[0], vb[1]);
            mma_16816<T>(o[dt + 1], pa, vb[2], vb[3]);
          }
        }
      }
      cp_async_wait<0>();
      __syncthreads();  // K_{j+1} has landed and every warp is done with s_v
      if (rope && has_next) {
        rope_rotate_tile<T, kBlockN, kStride>(s_k, k_off + n0 + kBlockN, p);
        __syncthreads();
      }
    }
  }

  // Epilogue: O / l, natural-log LSE; a row with no visible key keeps O = 0 and gets LSE -inf. Split: fp32 into
  // the split's partials (the merge kernel writes out and lse).
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float l = group_sum(l_run[rr]);
    if (row[rr] >= seq_q) continue;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const float row_lse = l > 0.0f ? (m_run[rr] + log2f(l)) * kLn2 : -INFINITY;
    const int64_t lse_row = (tb * p.heads_q + head[rr]) * p.seq_q + q_rows.start + row[rr];
    if (splits > 1) {
      const int64_t partial_row = split * p.lse_rows() + lse_row;
      float* out_row = args.ws.out_partial + partial_row * kHeadDim;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        *reinterpret_cast<float2*>(out_row + dt * 8 + 2 * t) =
            make_float2(o[dt][2 * rr] * inv, o[dt][2 * rr + 1] * inv);
      }
      if (t == 0) args.ws.lse_partial[partial_row] = row_lse;
    } else {
      T* out_row = static_cast<T*>(args.out.data) + tb * args.out.stride_b + head[rr] * args.out.stride_h +
                   (q_rows.start + row[rr]) * args.out.stride_n;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        *reinterpret_cast<uint32_t*>(out_row + dt * 8 + 2 * t) =
            pack2<T>(o[dt][2 * rr] * inv, o[dt][2 * rr + 1] * inv);
      }
      if (t == 0) args.lse[lse_row] = row_lse;
    }
  }
}

// out and lse of a split forward from its splits' partials (ForwardWorkspace): one warp per LSE row, each split
// weighted by exp(its LSE - the largest); a row no split saw a key of gets out 0, LSE -inf. Rows outside every
// packed sequence are not written (as the forward).
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads)
    attention_split_merge_kernel(const __grid_constant__ AttentionParams p, const __grid_constant__ ForwardArgs args) {
  constexpr int kPerLane = kHeadDim / kWarpSize;  // columns lane, lane + 32, ...
  const int lane = threadIdx.x % kWarpSize;
  const int64_t rows = p.lse_rows();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarpSize) + threadIdx.x / kWarpSize;
  if (i >= rows) return;
  const int64_t n = i % p.seq_q, h = i / p.seq_q % p.heads_q, tb = i / p.seq_q / p.heads_q;
  if (p.q_sequence_of(tb, n) < 0) return;
  float m = -INFINITY;
  for (int s = 0; s < args.plan.splits; ++s) m = fmaxf(m, args.ws.lse_partial[s * rows + i]);
  float acc[kPerLane] = {}, sum = 0.0f;
  if (m != -INFINITY) {
    for (int s = 0; s < args.plan.splits; ++s) {
      const float w = expf(args.ws.lse_partial[s * rows + i] - m);  // 0 for a split without keys
      const float* part = args.ws.out_partial + (s * rows + i) * kHeadDim;
      sum += w;
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) acc[c] += w * part[lane + c * kWarpSize];
    }
  }
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  T* out_row = static_cast<T*>(args.out.data) + tb * args.out.stride_b + h * args.out.stride_h + n * args.out.stride_n;
#pragma unroll
  for (int c = 0; c < kPerLane; ++c) out_row[lane + c * kWarpSize] = from_float<T>(acc[c] * inv);
  if (lane == 0) args.lse[i] = sum > 0.0f ? m + logf(sum) : -INFINITY;
}

}  // namespace fused_pos_attn::gpu
