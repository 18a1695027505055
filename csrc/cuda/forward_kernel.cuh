// CUDA attention forward kernel (FlashAttention-2): one block of 4 warps per (64 query rows, query head, batch or
// packed sequence; blocks past a sequence's rows exit at once);
// each warp owns 16 rows and runs the online softmax over the key blocks its rows can see, with tensor-core
// mma.sync for S = Q K^T and O += P V. Position math is applied where the data already is: RoPE rotates the
// q / k tiles in shared memory as they are loaded, ALiBi / relative biases and the causal-window mask are
// added to the fp32 accumulators in registers (each lane knows the (row, column) of its elements, mma.cuh).
// Scores live in the log2 domain (exp2); the LSE written out is natural-log.
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
  static constexpr int kBlockM = 64;            // query rows per block: 4 warps x 16
  static constexpr int kBlockN = 64;            // keys per step
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
};

// The forward's grid: (query blocks of the longest sequence, Hq, batch or sequences); empty (a 0 extent) when
// there is nothing to compute, which the launcher does not launch.
template <int kHeadDim>
dim3 forward_grid(const AttentionParams& p) {
  constexpr int kBlockM = ForwardConfig<kHeadDim>::kBlockM;
  return dim3(static_cast<unsigned>((p.max_q_len() + kBlockM - 1) / kBlockM), static_cast<unsigned>(p.heads_q),
              static_cast<unsigned>(p.batch));
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
  const int m0 = blockIdx.x * kBlockM, h = blockIdx.y, b = blockIdx.z;
  // Batch / sequence b's rows: q rows [q_rows.start, + seq_q) and k / v rows [k_rows.start, + seq_k) of tensor batch
  // tb. Below, row and key indices are b's own (0-based); the head pointers include the starts.
  const RowRange q_rows = p.q_rows(b), k_rows = p.k_rows(b);
  const int seq_q = static_cast<int>(q_rows.len), seq_k = static_cast<int>(k_rows.len);
  if (m0 >= seq_q) return;  // the grid covers the longest sequence
  const int64_t tb = p.tensor_batch(b);
  const int kv_h = h / static_cast<int>(p.heads_q / p.heads_kv);
  const int64_t q_off = p.q_offset[b], k_off = p.k_offset[b];

  // This lane's two rows (C fragment rows g and g + 8 of the warp's 16) and their visible key intervals.
  int row[2], key_first[2], key_last[2];
  int64_t q_pos[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    row[rr] = m0 + warp * 16 + g + 8 * rr;
    q_pos[rr] = q_off + row[rr];
    const KeyInterval iv = row[rr] < seq_q ? visible_keys(q_pos[rr], k_off, seq_k, p.causal, p.window)
                                           : KeyInterval{0, 0};
    key_first[rr] = static_cast<int>(iv.first);
    key_last[rr] = static_cast<int>(iv.last);
  }
  // Keys any row of the block sees: interval ends are non-decreasing in the row (position.h visible_keys).
  const int last_row = min(m0 + kBlockM, seq_q) - 1;
  const int n_lo = static_cast<int>(visible_keys(q_off + m0, k_off, seq_k, p.causal, p.window).first);
  const int n_hi = static_cast<int>(visible_keys(q_off + last_row, k_off, seq_k, p.causal, p.window).last);

  T* out = static_cast<T*>(args.out.data) + tb * args.out.stride_b + h * args.out.stride_h +
           q_rows.start * args.out.stride_n;
  float* lse = args.lse + (tb * p.heads_q + h) * p.seq_q + q_rows.start;

  float o[kDTiles][4] = {};
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};

  if (n_lo < n_hi) {
    const T* q_head = static_cast<const T*>(args.q.data) + tb * args.q.stride_b + h * args.q.stride_h +
                      q_rows.start * args.q.stride_n;
    const T* k_head = static_cast<const T*>(args.k.data) + tb * args.k.stride_b + kv_h * args.k.stride_h +
                      k_rows.start * args.k.stride_n;
    const T* v_head = static_cast<const T*>(args.v.data) + tb * args.v.stride_b + kv_h * args.v.stride_h +
                      k_rows.start * args.v.stride_n;
    const bool rope = p.pos == PosKind::kRope, alibi = p.pos == PosKind::kAlibi;
    const bool relative = p.pos == PosKind::kRelative;

    load_tile<T, kBlockM, kHeadDim, kStride>(s_q, q_head, args.q.stride_n, m0, seq_q, args.vec16);
    load_tile<T, kBlockN, kHeadDim, kStride>(s_k, k_head, args.k.stride_n, n_lo, seq_k, args.vec16);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if (rope) {
      rope_rotate_tile<T, kBlockM, kStride>(s_q, q_off + m0, p);
      rope_rotate_tile<T, kBlockN, kStride>(s_k, k_off + n_lo, p);
      __syncthreads();
    }
    uint32_t q_frag[kDSteps][4];
#pragma unroll
    for (int ks = 0; ks < kDSteps; ++ks) load_a(q_frag[ks], s_q, kStride, warp * 16, ks * 16, lane);
    __syncthreads();  // s_q is s_v from here on

    const float scale_log2 = static_cast<float>(p.scale) * kLog2e;  // biases are not scaled
    const float slope_log2 = alibi ? p.slopes[b * p.slope_stride_b + h * p.slope_stride_h] * kLog2e : 0.0f;
    const float* rel_table = relative ? p.rel_bias + h * 2 * (p.max_distance + 1) : nullptr;

    for (int n0 = n_lo; n0 < n_hi; n0 += kBlockN) {
      load_tile<T, kBlockN, kHeadDim, kStride>(s_v, v_head, args.v.stride_n, n0, seq_k, args.vec16);
      cp_async_commit();

      float s[kNTiles][4] = {};
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
              bias = alibi_bias(slope_log2, rel0 - col);
            } else if (relative) {
              bias = __ldg(rel_table + relative_bias_index(rel0 - col, p.max_distance)) * kLog2e;
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

      __syncthreads();  // every warp is done with s_k
      const bool has_next = n0 + kBlockN < n_hi;
      if (has_next) {
        load_tile<T, kBlockN, kHeadDim, kStride>(s_k, k_head, args.k.stride_n, n0 + kBlockN, seq_k, args.vec16);
      }
      cp_async_commit();
      cp_async_wait<1>();  // V_j has landed; K_{j+1} may still be in flight
      __syncthreads();

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
      cp_async_wait<0>();
      __syncthreads();  // K_{j+1} has landed and every warp is done with s_v
      if (rope && has_next) {
        rope_rotate_tile<T, kBlockN, kStride>(s_k, k_off + n0 + kBlockN, p);
        __syncthreads();
      }
    }
  }

  // Epilogue: O / l, natural-log LSE; a row with no visible key keeps O = 0 and gets LSE -inf.
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float l = group_sum(l_run[rr]);
    if (row[rr] >= seq_q) continue;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    T* out_row = out + row[rr] * args.out.stride_n;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      *reinterpret_cast<uint32_t*>(out_row + dt * 8 + 2 * t) = pack2<T>(o[dt][2 * rr] * inv, o[dt][2 * rr + 1] * inv);
    }
    if (t == 0) lse[row[rr]] = l > 0.0f ? (m_run[rr] + log2f(l)) * kLn2 : -INFINITY;
  }
}

}  // namespace fused_pos_attn::gpu
