// CPU attention forward: FlashAttention-2's online softmax over key blocks, one task per
// (batch or packed sequence, query head, block of kBlockM query rows of that sequence), handed to the threads
// one at a time (parallel_tasks), so sequences of different lengths stay balanced. Per-thread tiles only:
// nothing of size Nq x Nk.
#include "cpu_kernels.h"
#include "gemm.h"
#include "tiles.h"

namespace fused_pos_attn::cpu {
namespace {

template <typename scalar_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                  const AttentionParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = p.head_dim;
  const int64_t block_m = std::max<int64_t>(1, std::min(kBlockM, p.max_q_len()));
  const int64_t block_n = std::max<int64_t>(1, std::min(kBlockN, p.max_k_len()));
  // Tasks in (b, h, query block) order: b's tasks start at task_start[b] (query blocks of b times Hq).
  std::vector<int64_t> task_start(p.batch + 1, 0);
  for (int64_t b = 0; b < p.batch; ++b) {
    task_start[b + 1] = task_start[b] + (p.q_len(b) + block_m - 1) / block_m * p.heads_q;
  }
  const bool rope = p.pos == PosKind::kRope, alibi = p.pos == PosKind::kAlibi;
  RopeTables<acc_t> rope_q, rope_k;
  const RopeTables<acc_t>* q_rope = nullptr;
  const RopeTables<acc_t>* k_rope = nullptr;  // q's table in self-attention
  if (rope) {
    const bool shared = make_qk_rope_tables(p, rope_q, rope_k);
    q_rope = &rope_q;
    k_rope = shared ? &rope_q : &rope_k;
  }
  const auto qv = view4<const scalar_t>(q), kv = view4<const scalar_t>(k), vv = view4<const scalar_t>(v);
  const auto ov = view4<scalar_t>(out);
  acc_t* lse_data = lse.data_ptr<acc_t>();
  // fp32/fp64 rows with unit stride are read in place by BLAS; everything else is packed.
  const bool k_in_place = std::is_same_v<scalar_t, acc_t> && k.stride(3) == 1 && !rope;
  const bool v_in_place = std::is_same_v<scalar_t, acc_t> && v.stride(3) == 1;

  parallel_tasks(task_start[p.batch], {}, [&](const auto& next_task) {
    SequentialBlasScope sequential_blas;
    std::vector<acc_t> q_tile(block_m * D), k_tile(block_n * D), v_tile(block_n * D), scores(block_m * block_n);
    std::vector<acc_t> acc(block_m * D), row_max_v(block_m), row_sum(block_m);
    RowIntervals intervals;
    for (int64_t task = next_task(); task >= 0; task = next_task()) {
      const int64_t b = std::upper_bound(task_start.begin(), task_start.end(), task) - task_start.begin() - 1;
      const int64_t q_blocks = (task_start[b + 1] - task_start[b]) / p.heads_q;
      const int64_t h = (task - task_start[b]) / q_blocks, i0 = (task - task_start[b]) % q_blocks * block_m;
      const int64_t kv_h = h / p.group(), tb = p.tensor_batch(b);
      const RowRange q_rows = p.q_rows(b);
      const int64_t k_row0 = p.k_start(b);  // b's key j is row k_row0 + j of k and v
      const int64_t rows = std::min(block_m, q_rows.len - i0), row0 = q_rows.start + i0;  // rows of q, out, lse
      const acc_t slope = alibi ? static_cast<acc_t>(p.slope(b, h)) : acc_t(0);
      pack_rows(qv, tb, h, row0, rows, D, static_cast<acc_t>(p.scale), q_rope, p.interleaved, q_tile.data());
      visible_intervals(p, b, i0, rows, intervals);
      std::fill(row_max_v.begin(), row_max_v.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
      std::fill(acc.begin(), acc.end(), acc_t(0));

      for (int64_t n0 = intervals.lo; n0 < intervals.hi; n0 += block_n) {
        const int64_t cols = std::min(block_n, intervals.hi - n0);
        const auto [k_ptr, ldk] = gemm_rows(kv, k_in_place, tb, kv_h, k_row0 + n0, cols, D, k_rope, p.interleaved,
                                            k_tile.data());
        gemm<acc_t>(false, true, rows, cols, D, acc_t(1), q_tile.data(), D, k_ptr, ldk, acc_t(0), scores.data(), cols);

        for (int64_t r = 0; r < rows; ++r) {
          acc_t* s = scores.data() + r * cols;
          const int64_t lo = std::clamp(intervals.rows[r].first - n0, int64_t{0}, cols);
          const int64_t hi = std::clamp(intervals.rows[r].last - n0, int64_t{0}, cols);
          if (lo >= hi) {  // no visible key for this row in this block
            std::fill(s, s + cols, acc_t(0));
            continue;
          }
          const int64_t rel0 = p.q_offset[b] + i0 + r - (p.k_offset[b] + n0);
          softmax_block_row(p, h, slope, s, cols, lo, hi, rel0, row_max_v[r], row_sum[r], acc.data() + r * D, D);
        }

        const auto [v_ptr, ldv] = gemm_rows(vv, v_in_place, tb, kv_h, k_row0 + n0, cols, D,
                                            static_cast<const RopeTables<acc_t>*>(nullptr), false, v_tile.data());
        gemm<acc_t>(false, false, rows, D, cols, acc_t(1), scores.data(), cols, v_ptr, ldv, acc_t(1), acc.data(), D);
      }

      for (int64_t r = 0; r < rows; ++r) {
        write_output_row(ov, lse_data, p, tb, h, row0 + r, acc.data() + r * D, row_max_v[r], row_sum[r]);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const AttentionParams& p) {
  auto out = at::empty_like(q);
  // LSE in the accumulation type: fp32, or fp64 for fp64 inputs; (1, Hq, total_q) when packed.
  auto lse = at::empty({q.size(0), p.heads_q, p.seq_q},
                       q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  TORCH_CHECK(!p.paged() || q.scalar_type() != at::kDouble,
              "paged caches take float16, bfloat16 or float32 on CPU, got float64");
  if (uses_decode_path(q, p)) {
    attention_decode_forward(q, k, v, out, lse, p);
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fused_pos_attn_forward_cpu",
                                  [&] { forward_impl<scalar_t>(q, k, v, out, lse, p); });
  return {out, lse};
}

}  // namespace fused_pos_attn::cpu
