// CUDA attention backward kernels (FlashAttention-2), three of them:
//   1. preprocess: delta = rowsum(dO * O) - dLSE (fp32), one warp per query row (dLSE: the gradient of the
//      returned LSE, zero when absent or when the row has no visible key).
//   2. dK / dV: one block of 4 warps per (64 keys, kv head, batch or packed sequence; blocks past a sequence's
//      keys exit at once); each warp owns 16 keys, keeps their dK and dV in registers and walks every query
//      head of its GQA group and every query tile that can see the
//      block (tiles that cannot are skipped). Per tile it recomputes S^T = K Q^T and P^T = exp2(S^T - LSE),
//      then dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q, and adds dS K, the tile's
//      share of dQ, to an fp32 dq_accum with atomics (FlashAttention-2's choice: no second pass over the keys,
//      at the price of nondeterministic summation order in dq). The relative table's gradient is dS summed
//      per distance: per tile along its diagonals (one distance each) in shared memory, then added to the
//      block's own copy of the table row in shared memory, written once per (block, query head) as a partial
//      row (add_tile_table_grad below).
//   3. dq: dq = dq_accum * scale, rotated back for RoPE, cast to the input dtype.
//   4. relative table gradient only: the partial rows summed over batch (or sequences) and key blocks in a fixed
//      order, so the table gradient is deterministic. A table too large for shared memory
//      (rel_table_in_shared_memory) takes the tiles' diagonal sums with fp32 atomics into the table instead (no
//      partial rows, no kernel 4).
// q and k are rotated in shared memory as their tiles load, so every product runs on rotated q' / k';
// gradients w.r.t. q' / k' are mapped back with the transposed rotation (dK in this kernel's epilogue, dQ in
// kernel 3). Scores and LSE are in the log2 domain inside the kernels.
#pragma once

#include <cmath>

#include "cuda/launch.h"
#include "cuda/mma.cuh"
#include "cuda/tile.cuh"

namespace fused_pos_attn::gpu {

template <int kHeadDim>
struct BackwardConfig {
  static constexpr int kBlockN = kBackwardBlockN;            // keys per block: 4 warps x 16
  static constexpr int kBlockM = kHeadDim <= 64 ? 64 : 32;   // query rows per step (registers bound it at D=128)
  static constexpr int kStride = kHeadDim + 8;               // padded shared row stride of K, V, Q, dO
  static constexpr int kDsStride = kBlockM + 8;              // padded shared row stride of dS^T (keys x queries)
  static constexpr int kDkStride = kHeadDim + 4;             // fp32 dK staging row stride (RoPE epilogue)
  static constexpr int kDsF32Stride = kBlockM + 4;           // fp32 dS^T row stride (relative table gradient)
  static constexpr int kDiagonals = kBlockM + kBlockN - 1;   // query - key offsets in a tile: one thread each
  static_assert(kDiagonals <= kThreads, "a tile's diagonals must fit the block's threads");
  // dQ tile (kBlockM x D) = dS K, split over the 4 warps: kBlockM / 16 row groups x column slices.
  static constexpr int kDqRowGroups = kBlockM / 16;
  static constexpr int kDqCols = kHeadDim / (4 / kDqRowGroups);
  static_assert(4 % kDqRowGroups == 0 && kDqCols % 16 == 0, "dQ work must split evenly over 4 warps");

  // Shared memory, in bytes from the start: K, V (whole block), Q, dO (per query tile), dS^T, the query
  // tile's QueryRow entries, the block's batch / sequence row ranges (2 RowRange); then, only when the relative
  // table needs a gradient, the tile's dS^T in fp32, a scratch of 2 floats per warp, and the block's table row
  // (row_entries fp32, rel_table_in_shared_memory).
  template <typename T>
  struct Layout {
    static constexpr int kv_tile = kBlockN * kStride * static_cast<int>(sizeof(T));
    static constexpr int q_tile = kBlockM * kStride * static_cast<int>(sizeof(T));
    static constexpr int k = 0, v = k + kv_tile, q = v + kv_tile, dout = q + q_tile, ds = dout + q_tile;
    static constexpr int rows = ds + kBlockN * kDsStride * static_cast<int>(sizeof(T));
    static constexpr int seq = rows + kBlockM * 16;
    static constexpr int end = seq + 2 * static_cast<int>(sizeof(RowRange));
    static constexpr int ds_f32 = end;
    static constexpr int far_sums = ds_f32 + kBlockN * kDsF32Stride * 4;
    static constexpr int rel_row = far_sums + kThreads / kWarpSize * 2 * 4;
    static constexpr int dk_staging = kBlockN * kDkStride * 4;  // after the main loop; aliases K and V only
    static_assert(dk_staging <= q, "the dK staging must leave the row ranges (seq) intact");
    static constexpr int bytes = end > dk_staging ? end : dk_staging;

    // Dynamic shared memory of a launch: bytes, plus the table-gradient regions when table_grad.
    static constexpr int launch_bytes(bool table_grad, int64_t row_entries) {
      const int with_table = rel_row + static_cast<int>(row_entries) * 4;
      return table_grad && with_table > bytes ? with_table : bytes;
    }
    // The largest launch: the relative table gradient with the largest row kept in shared memory.
    static constexpr int max_bytes = launch_bytes(true, kMaxSharedRelEntries);
  };
};

// What the dK / dV kernel needs of one query row besides q and dO (one 16-byte shared load).
struct alignas(16) QueryRow {
  float lse_log2;           // LSE in log2 units; +inf for a row without visible key, so exp2(s - lse) = 0
  float delta;              // rowsum(dO * O) - dLSE
  int key_first, key_last;  // visible key interval (position.h visible_keys)
};

// Per-query-row arrays (lse, delta, dq_accum) have the rows of the tensors: (B, Hq, Nq), packed (1, Hq, total_q).
struct BackwardArgs {
  Tensor4 grad_out, q, k, v, dk, dv;
  const float* lse;    // (B, Hq, Nq), natural log
  const float* delta;  // (B, Hq, Nq)
  float* dq_accum;     // (B, Hq, Nq, D)
  float* d_rel_bias;   // (Hq, 2, max_distance + 1) when relative and the table needs a gradient, else null
  // (B, key blocks, Hq, 2 * (max_distance + 1)) (B: the sequences when packed, key blocks of the longest): each
  // block's table row per query head, when the row is kept in shared memory (rel_table_in_shared_memory); null
  // otherwise (the tiles then add to d_rel_bias atomically).
  float* d_rel_partial;
  bool vec16;          // grad_out, q, k, v all allow 16-byte cp.async
};

// delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] - dLSE[b, h, i]: one warp per row of the tensors (b the
// tensor batch; packed, rows outside every sequence get a delta nobody reads). grad_lse may be null (zero); a row
// whose lse is -inf has P = 0, so its dLSE is left out (it could only turn 0 into NaN).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    attention_backward_preprocess_kernel(const __grid_constant__ AttentionParams p, const Tensor4 grad_out,
                                         const Tensor4 out, const float* lse, const float* grad_lse, float* delta) {
  const int64_t rows = p.lse_rows();
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kWarpSize; r < rows;
       r += static_cast<int64_t>(gridDim.x) * (kThreads / kWarpSize)) {
    const int64_t i = r % p.seq_q, h = r / p.seq_q % p.heads_q, tb = r / (p.seq_q * p.heads_q);
    const T* d_o = static_cast<const T*>(grad_out.data) + tb * grad_out.stride_b + h * grad_out.stride_h +
                   i * grad_out.stride_n;
    const T* o = static_cast<const T*>(out.data) + tb * out.stride_b + h * out.stride_h + i * out.stride_n;
    float sum = 0.0f;
    for (int d = lane; d < p.head_dim; d += kWarpSize) sum += to_float(d_o[d]) * to_float(o[d]);
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) delta[r] = grad_lse != nullptr && lse[r] != -INFINITY ? sum - grad_lse[r] : sum;
  }
}

// *entry += value: a plain add into the block's own shared row, an atomic one into global memory.
__device__ __forceinline__ void add_table_grad(float* entry, float value, bool shared) {
  if (shared) {
    *entry += value;
  } else {
    atomicAdd(entry, value);
  }
}

// One tile's share of the relative table's gradient. s_ds_f32: the tile's dS^T (kBlockN keys x kBlockM queries,
// fp32, row stride kStride; 0 where not visible). Every (query, key) on a diagonal query - key = offset is at
// distance rel = rel0 + offset, so one table entry: thread d sums diagonal d in key order. Diagonals nearer than
// max_distance map to distinct entries; the far ones on each side share one entry, summed over the block first
// (warp shuffles, then the warps in order, through s_far). row: the block's own shared row (plain adds, so
// deterministic) or the table in global memory (shared false: atomics). Contains a block barrier.
template <int kBlockM, int kBlockN, int kStride>
__device__ __forceinline__ void add_tile_table_grad(const float* s_ds_f32, float* s_far, int rel0,
                                                    int64_t max_distance, float* row, bool shared) {
  const int d = threadIdx.x, offset = d - (kBlockN - 1);
  const bool diagonal = d < kBlockM + kBlockN - 1;
  float sum = 0.0f;
  if (diagonal) {
    const int key_first = offset < 0 ? -offset : 0, key_last = kBlockM - offset < kBlockN ? kBlockM - offset : kBlockN;
    for (int key = key_first; key < key_last; ++key) sum += s_ds_f32[key * kStride + key + offset];
  }
  const int rel = rel0 + offset;  // rel0 is clamped to +-2^30: no overflow
  const bool far_after = diagonal && rel <= -max_distance, far_before = diagonal && rel >= max_distance;
  if (diagonal && !far_after && !far_before && sum != 0.0f) {
    add_table_grad(row + relative_bias_index(rel, max_distance), sum, shared);
  }
  float after = far_after ? sum : 0.0f, before = far_before ? sum : 0.0f;
#pragma unroll
  for (int step = kWarpSize / 2; step > 0; step /= 2) {
    after += __shfl_xor_sync(0xffffffffu, after, step);
    before += __shfl_xor_sync(0xffffffffu, before, step);
  }
  if (threadIdx.x % kWarpSize == 0) {
    s_far[2 * (threadIdx.x / kWarpSize)] = after;
    s_far[2 * (threadIdx.x / kWarpSize) + 1] = before;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    after = before = 0.0f;
    for (int w = 0; w < kThreads / kWarpSize; ++w) {
      after += s_far[2 * w];
      before += s_far[2 * w + 1];
    }
    if (after != 0.0f) add_table_grad(row + relative_bias_index(-max_distance, max_distance), after, shared);
    if (before != 0.0f) add_table_grad(row + relative_bias_index(max_distance, max_distance), before, shared);
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads)
    attention_backward_dkdv_kernel(const __grid_constant__ AttentionParams p,
                                   const __grid_constant__ BackwardArgs args) {
  using Cfg = BackwardConfig<kHeadDim>;
  using Layout = typename Cfg::template Layout<T>;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStride = Cfg::kStride;
  constexpr int kDsStride = Cfg::kDsStride, kDqCols = Cfg::kDqCols, kDqRowGroups = Cfg::kDqRowGroups;
  constexpr int kDsF32Stride = Cfg::kDsF32Stride;
  constexpr int kDSteps = kHeadDim / 16;  // k-steps over the head dim
  constexpr int kMTiles = kBlockM / 8;    // n8 tiles of S^T (per warp: 16 keys x kBlockM queries)
  constexpr int kDTiles = kHeadDim / 8;   // n8 tiles of dK, dV (per warp: 16 keys x kHeadDim)

  extern __shared__ __align__(16) unsigned char smem[];
  T* s_k = reinterpret_cast<T*>(smem + Layout::k);
  T* s_v = reinterpret_cast<T*>(smem + Layout::v);
  T* s_q = reinterpret_cast<T*>(smem + Layout::q);
  T* s_do = reinterpret_cast<T*>(smem + Layout::dout);
  T* s_ds = reinterpret_cast<T*>(smem + Layout::ds);
  QueryRow* s_rows = reinterpret_cast<QueryRow*>(smem + Layout::rows);
  RowRange* s_seq = reinterpret_cast<RowRange*>(smem + Layout::seq);  // b's query rows, b's key rows
  float* s_ds_f32 = reinterpret_cast<float*>(smem + Layout::ds_f32);  // relative table gradient only
  float* s_far = reinterpret_cast<float*>(smem + Layout::far_sums);
  float* s_rel_row = reinterpret_cast<float*>(smem + Layout::rel_row);

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, g = lane / 4, t = lane % 4;
  const int n0 = blockIdx.x * kBlockN, kv_h = blockIdx.y, b = blockIdx.z;
  // Batch / sequence b's rows: q / dO rows [q_rows.start, + seq_q()) and k / v / dk / dv rows [k_rows.start,
  // + seq_k()) of tensor batch tb. Below, query and key indices are b's own (0-based); the head pointers include the
  // starts. The ranges stay in shared memory and are read where used (so are the pointers and LSE rows derived from
  // them, q_head / do_head / row_base below): held in registers through the kernel, they push the D = 128
  // instantiations past 255 registers (spills).
  if (threadIdx.x == 0) {
    s_seq[0] = p.q_rows(b);
    s_seq[1] = p.k_rows(b);
  }
  __syncthreads();
  const RowRange& q_rows = s_seq[0];
  const RowRange& k_rows = s_seq[1];
  const auto seq_q = [&] { return static_cast<int>(q_rows.len); };
  const auto seq_k = [&] { return static_cast<int>(k_rows.len); };
  if (n0 >= seq_k()) return;  // the grid covers the longest sequence
  const int64_t tb = p.tensor_batch(b);
  const int n1 = min(n0 + kBlockN, seq_k());
  const int group = static_cast<int>(p.heads_q / p.heads_kv);
  const int64_t q_off = p.q_offset[b], k_off = p.k_offset[b];
  const bool rope = p.pos == PosKind::kRope, alibi = p.pos == PosKind::kAlibi;
  const bool relative = p.pos == PosKind::kRelative;
  const bool table_grad = args.d_rel_bias != nullptr;  // relative, and the table needs a gradient
  const bool row_in_smem = table_grad && args.d_rel_partial != nullptr;  // else atomics into d_rel_bias
  const int row_entries = static_cast<int>(2 * (p.max_distance + 1));
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;

  const T* k_head = static_cast<const T*>(args.k.data) + tb * args.k.stride_b + kv_h * args.k.stride_h +
                    k_rows.start * args.k.stride_n;
  const T* v_head = static_cast<const T*>(args.v.data) + tb * args.v.stride_b + kv_h * args.v.stride_h +
                    k_rows.start * args.v.stride_n;
  load_tile<T, kBlockN, kHeadDim, kStride>(s_k, k_head, args.k.stride_n, n0, seq_k(), args.vec16);
  load_tile<T, kBlockN, kHeadDim, kStride>(s_v, v_head, args.v.stride_n, n0, seq_k(), args.vec16);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  if (rope) {
    rope_rotate_tile<T, kBlockN, kStride>(s_k, k_off + n0, p);
    __syncthreads();
  }

  float dk[kDTiles][4] = {}, dv[kDTiles][4] = {};
  const int key_local[2] = {warp * 16 + g, warp * 16 + g + 8};  // this lane's key rows (C fragment rows)

  // Head h's query rows of b in q and dO, and b's row 0 of head h in lse / delta / dq_accum: recomputed where used.
  const auto q_head = [&](int h) {
    return static_cast<const T*>(args.q.data) + tb * args.q.stride_b + h * args.q.stride_h +
           q_rows.start * args.q.stride_n;
  };
  const auto do_head = [&](int h) {
    return static_cast<const T*>(args.grad_out.data) + tb * args.grad_out.stride_b + h * args.grad_out.stride_h +
           q_rows.start * args.grad_out.stride_n;
  };
  const auto row_base = [&](int h) { return (tb * p.heads_q + h) * p.seq_q + q_rows.start; };

  for (int h = kv_h * group; h < (kv_h + 1) * group; ++h) {
    const float slope_log2 = alibi ? p.slopes[b * p.slope_stride_b + h * p.slope_stride_h] * kLog2e : 0.0f;
    const float* rel_table = relative ? p.rel_bias + h * 2 * (p.max_distance + 1) : nullptr;
    float* d_rel_row = row_in_smem ? s_rel_row : (table_grad ? args.d_rel_bias + h * row_entries : nullptr);
    if (row_in_smem) {  // zero this head's row (the tile loop's barriers publish it before any add)
      for (int e = threadIdx.x; e < row_entries; e += kThreads) s_rel_row[e] = 0.0f;
    }

    for (int m0 = 0; m0 < seq_q(); m0 += kBlockM) {
      // Skip query tiles none of whose rows sees a key of this block (visible intervals are monotone in the row).
      const int last_row = min(m0 + kBlockM, seq_q()) - 1;
      const KeyInterval first_iv = visible_keys(q_off + m0, k_off, seq_k(), p.causal, p.window);
      const KeyInterval last_iv = visible_keys(q_off + last_row, k_off, seq_k(), p.causal, p.window);
      if (first_iv.first >= n1 || last_iv.last <= n0 || last_iv.last <= first_iv.first) continue;

      load_tile<T, kBlockM, kHeadDim, kStride>(s_q, q_head(h), args.q.stride_n, m0, seq_q(), args.vec16);
      load_tile<T, kBlockM, kHeadDim, kStride>(s_do, do_head(h), args.grad_out.stride_n, m0, seq_q(), args.vec16);
      cp_async_commit();
      if (threadIdx.x < kBlockM) {
        const int i = m0 + threadIdx.x;
        const bool valid = i < seq_q();
        const float lse = valid ? args.lse[row_base(h) + i] : -INFINITY;
        const KeyInterval iv = valid ? visible_keys(q_off + i, k_off, seq_k(), p.causal, p.window) : KeyInterval{0, 0};
        s_rows[threadIdx.x] = QueryRow{lse == -INFINITY ? INFINITY : lse * kLog2e,
                                       valid ? args.delta[row_base(h) + i] : 0.0f, static_cast<int>(iv.first),
                                       static_cast<int>(iv.last)};
      }
      cp_async_wait<0>();
      __syncthreads();
      if (rope) {
        rope_rotate_tile<T, kBlockM, kStride>(s_q, q_off + m0, p);
        __syncthreads();
      }

      // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x kBlockM queries.
      float st[kMTiles][4] = {}, dpt[kMTiles][4] = {};
#pragma unroll
      for (int ks = 0; ks < kDSteps; ++ks) {
        uint32_t ka[4], va[4];
        load_a(ka, s_k, kStride, warp * 16, ks * 16, lane);
        load_a(va, s_v, kStride, warp * 16, ks * 16, lane);
#pragma unroll
        for (int mt = 0; mt < kMTiles; mt += 2) {
          uint32_t qb[4], ob[4];
          load_b_nk(qb, s_q, kStride, mt * 8, ks * 16, lane);
          load_b_nk(ob, s_do, kStride, mt * 8, ks * 16, lane);
          mma_16816<T>(st[mt], ka, qb[0], qb[1]);
          mma_16816<T>(st[mt + 1], ka, qb[2], qb[3]);
          mma_16816<T>(dpt[mt], va, ob[0], ob[1]);
          mma_16816<T>(dpt[mt + 1], va, ob[2], ob[3]);
        }
      }

      // P^T (into st) and dS^T = P^T (dP^T - delta) (into dpt). rel = pq - pk, pq - pk of (query m0, key n0)
      // saturated like position.h's clamp_rel so per-element math stays in int32.
      const int rel0 = static_cast<int>(clamp_rel(q_off + m0 - (k_off + n0)));
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key_local[e / 2], qc = mt * 8 + 2 * t + e % 2;
          const QueryRow query = s_rows[qc];
          const int rel = rel0 + qc - key;
          float bias = 0.0f;
          if (alibi) {
            bias = alibi_bias(slope_log2, rel);
          } else if (relative) {
            bias = __ldg(rel_table + relative_bias_index(rel, p.max_distance)) * kLog2e;
          }
          const bool visible = n0 + key >= query.key_first && n0 + key < query.key_last;
          const float prob = visible ? exp2f(st[mt][e] * scale_log2 + bias - query.lse_log2) : 0.0f;
          const float ds = prob * (dpt[mt][e] - query.delta);
          st[mt][e] = prob;
          dpt[mt][e] = ds;
        }
      }

      // dV += P^T dO and dK += dS^T Q' (k-steps over the tile's queries).
#pragma unroll
      for (int ks = 0; ks < kBlockM / 16; ++ks) {
        uint32_t pa[4], dsa[4];
        c_to_a<T>(pa, st[2 * ks], st[2 * ks + 1]);
        c_to_a<T>(dsa, dpt[2 * ks], dpt[2 * ks + 1]);
#pragma unroll
        for (int dt = 0; dt < kDTiles; dt += 2) {
          uint32_t ob[4], qb[4];
          load_b_kn(ob, s_do, kStride, ks * 16, dt * 8, lane);
          load_b_kn(qb, s_q, kStride, ks * 16, dt * 8, lane);
          mma_16816<T>(dv[dt], pa, ob[0], ob[1]);
          mma_16816<T>(dv[dt + 1], pa, ob[2], ob[3]);
          mma_16816<T>(dk[dt], dsa, qb[0], qb[1]);
          mma_16816<T>(dk[dt + 1], dsa, qb[2], qb[3]);
        }
      }

      // dS^T to shared memory: dQ needs it with queries as rows; the table gradient in fp32.
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          *reinterpret_cast<uint32_t*>(s_ds + key_local[rr] * kDsStride + mt * 8 + 2 * t) =
              pack2<T>(dpt[mt][2 * rr], dpt[mt][2 * rr + 1]);
          if (table_grad) {
            *reinterpret_cast<float2*>(s_ds_f32 + key_local[rr] * kDsF32Stride + mt * 8 + 2 * t) =
                make_float2(dpt[mt][2 * rr], dpt[mt][2 * rr + 1]);
          }
        }
      }
      __syncthreads();

      // dQ'[m0 + rows] += dS K' for this warp's 16 rows x kDqCols columns, into dq_accum with fp32 atomics.
      {
        const int row_group = warp % kDqRowGroups, col0 = (warp / kDqRowGroups) * kDqCols;
        float dq[kDqCols / 8][4] = {};
#pragma unroll
        for (int ks = 0; ks < kBlockN / 16; ++ks) {
          uint32_t dsa[4];
          load_a_trans(dsa, s_ds, kDsStride, ks * 16, row_group * 16, lane);
#pragma unroll
          for (int dt = 0; dt < kDqCols / 8; dt += 2) {
            uint32_t kb[4];
            load_b_kn(kb, s_k, kStride, ks * 16, col0 + dt * 8, lane);
            mma_16816<T>(dq[dt], dsa, kb[0], kb[1]);
            mma_16816<T>(dq[dt + 1], dsa, kb[2], kb[3]);
          }
        }
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int i = m0 + row_group * 16 + g + 8 * rr;
          if (i >= seq_q()) continue;
          float* dst = args.dq_accum + (row_base(h) + i) * kHeadDim + col0 + 2 * t;
#pragma unroll
          for (int dt = 0; dt < kDqCols / 8; ++dt) {
            atomicAdd(dst + dt * 8, dq[dt][2 * rr]);
            atomicAdd(dst + dt * 8 + 1, dq[dt][2 * rr + 1]);
          }
        }
      }
      if (table_grad) {
        add_tile_table_grad<kBlockM, kBlockN, kDsF32Stride>(s_ds_f32, s_far, rel0, p.max_distance, d_rel_row,
                                                            row_in_smem);
      }
      __syncthreads();  // the next tile overwrites s_q, s_do, s_ds and the row arrays
    }
    if (row_in_smem) {  // this block's partial row for head h
      float* partial = args.d_rel_partial + ((static_cast<int64_t>(b) * gridDim.x + blockIdx.x) * p.heads_q + h) *
                                                row_entries;
      for (int e = threadIdx.x; e < row_entries; e += kThreads) partial[e] = s_rel_row[e];
      __syncthreads();  // before the next head zeroes the row
    }
  }

  // Epilogue: dV as is, dK' times scale and, for RoPE, rotated back at the keys' positions.
  const float scale = static_cast<float>(p.scale);
  T* dv_head = static_cast<T*>(args.dv.data) + tb * args.dv.stride_b + kv_h * args.dv.stride_h +
               k_rows.start * args.dv.stride_n;
  T* dk_head = static_cast<T*>(args.dk.data) + tb * args.dk.stride_b + kv_h * args.dk.stride_h +
               k_rows.start * args.dk.stride_n;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int key = n0 + key_local[rr];
    if (key >= seq_k()) continue;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      const int col = dt * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(dv_head + key * args.dv.stride_n + col) =
          pack2<T>(dv[dt][2 * rr], dv[dt][2 * rr + 1]);
      if (!rope) {
        *reinterpret_cast<uint32_t*>(dk_head + key * args.dk.stride_n + col) =
            pack2<T>(dk[dt][2 * rr] * scale, dk[dt][2 * rr + 1] * scale);
      }
    }
  }
  if (rope) {  // each column needs its rotation partner: stage dK' (fp32) in shared memory
    constexpr int kDkStride = Cfg::kDkStride;
    float* s_dk = reinterpret_cast<float*>(smem);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        s_dk[key_local[rr] * kDkStride + dt * 8 + 2 * t] = dk[dt][2 * rr] * scale;
        s_dk[key_local[rr] * kDkStride + dt * 8 + 2 * t + 1] = dk[dt][2 * rr + 1] * scale;
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kBlockN * kHeadDim; e += kThreads) {
      const int r = e / kHeadDim, d = e % kHeadDim;
      if (n0 + r >= seq_k()) continue;
      const float* x = s_dk + r * kDkStride;
      float value = x[d];
      if (d < p.rotary_dim) {
        const RopeColumn col = rope_column(d, p.rotary_dim, p.interleaved);
        value = rope_rotate_back(value, x[col.partner], col, k_off + n0 + r, p);
      }
      dk_head[(n0 + r) * args.dk.stride_n + d] = from_float<T>(value);
    }
  }
}

// dq = dq_accum * scale, rotated back at the queries' positions for RoPE, in the input dtype: every row of the
// tensors (packed, a row that no sequence processes has dq_accum 0, so dq 0).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    attention_backward_dq_kernel(const __grid_constant__ AttentionParams p, const float* dq_accum, const Tensor4 dq) {
  const int64_t head_dim = p.head_dim, total = p.lse_rows() * head_dim;
  const float scale = static_cast<float>(p.scale);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = e / head_dim, i = r % p.seq_q, h = r / p.seq_q % p.heads_q, tb = r / (p.seq_q * p.heads_q);
    const int d = static_cast<int>(e % head_dim);
    float value = dq_accum[e] * scale;
    if (p.pos == PosKind::kRope && d < p.rotary_dim) {
      const int64_t b = p.q_sequence_of(tb, i);  // row i is b's row i - q_start(b)
      if (b >= 0) {
        const RopeColumn col = rope_column(d, p.rotary_dim, p.interleaved);
        value = rope_rotate_back(value, dq_accum[r * head_dim + col.partner] * scale, col,
                                 p.q_offset[b] + i - p.q_start(b), p);
      }
    }
    static_cast<T*>(dq.data)[tb * dq.stride_b + h * dq.stride_h + i * dq.stride_n + d] = from_float<T>(value);
  }
}

// d_rel_bias[h, e] = the sum over (batch, key block) of the dK / dV blocks' partial rows, in a fixed order. key_blocks:
// the grid's (of the longest sequence); a shorter sequence's blocks past its keys exited without a partial row.
__global__ void __launch_bounds__(kThreads)
    attention_backward_rel_reduce_kernel(const __grid_constant__ AttentionParams p, const float* partial,
                                         int key_blocks, float* d_rel_bias) {
  const int64_t row_entries = 2 * (p.max_distance + 1), total = p.heads_q * row_entries;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    float sum = 0.0f;
    for (int64_t b = 0; b < p.batch; ++b) {
      const int64_t blocks = (p.k_len(b) + kBackwardBlockN - 1) / kBackwardBlockN;
      for (int64_t block = b * key_blocks; block < b * key_blocks + blocks; ++block) sum += partial[block * total + e];
    }
    d_rel_bias[e] = sum;
  }
}

// The dK / dV kernel's grid: (key blocks of the longest sequence, Hkv, batch or sequences); empty (a 0 extent)
// when there is nothing to compute, which the launcher does not launch.
inline dim3 backward_dkdv_grid(const AttentionParams& p) {
  return dim3(static_cast<unsigned>((p.max_k_len() + kBackwardBlockN - 1) / kBackwardBlockN),
              static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(p.batch));
}

}  // namespace fused_pos_attn::gpu
