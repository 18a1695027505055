// CPU attention backward (FlashAttention-2): one task per (batch or packed sequence, kv head) owns that head's
// dK / dV (accumulated over its query-head group, so no atomics and a deterministic result) and the dQ of
// every query head of the group. Tasks go to the threads one at a time, the costliest (longest sequences)
// first, so a packed call's sequences of different lengths stay balanced. Scores are recomputed from q, k and
// the saved LSE; a gradient of the LSE enters through delta = rowsum(dO * O) - dLSE (dS = P * (dP - delta)).
// The relative bias table's gradient is summed per (batch, head) in a fixed order, then over the batch:
// deterministic.
#include "cpu_kernels.h"
#include "gemm.h"
#include "tiles.h"

#include <numeric>

namespace fused_pos_attn::cpu {
namespace {

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_out, const at::Tensor* grad_lse, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dv, at::Tensor& d_rel_bias, const AttentionParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = p.head_dim;
  const int64_t block_m = std::max<int64_t>(1, std::min(kBlockM, p.max_q_len()));
  const int64_t block_n = std::max<int64_t>(1, std::min(kBlockN, p.max_k_len()));
  const bool rope = p.pos == PosKind::kRope, alibi = p.pos == PosKind::kAlibi;
  const bool relative = p.pos == PosKind::kRelative;
  const bool table_grad = relative && d_rel_bias.numel() > 0;
  // (B, Hq, 2 * (max_distance + 1)) per-batch partial sums of the relative table's gradient.
  std::vector<acc_t> d_rel_partial(table_grad ? p.batch * p.heads_q * p.rel_bias_stride_h() : 0, acc_t(0));
  // Tasks (b, kv head) = b * Hkv + kv head, run in order of decreasing cost (query rows x keys of b; stable, so
  // a dense call keeps its natural order).
  std::vector<int64_t> order(p.batch * p.heads_kv), cost(p.batch);
  for (int64_t b = 0; b < p.batch; ++b) cost[b] = p.q_len(b) * p.k_len(b) + p.q_len(b) + p.k_len(b);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return cost[x / p.heads_kv] > cost[y / p.heads_kv]; });
  RopeTables<acc_t> rope_q, rope_k;
  const RopeTables<acc_t>* q_rope = nullptr;
  const RopeTables<acc_t>* k_rope = nullptr;  // q's table in self-attention
  if (rope) {
    const bool shared = make_qk_rope_tables(p, rope_q, rope_k);
    q_rope = &rope_q;
    k_rope = shared ? &rope_q : &rope_k;
  }
  const RopeTables<acc_t>* no_rope = nullptr;
  const auto qv = view4<const scalar_t>(q), kv = view4<const scalar_t>(k), vv = view4<const scalar_t>(v);
  const auto ov = view4<const scalar_t>(out), dov = view4<const scalar_t>(grad_out);
  const auto dqv = view4<scalar_t>(dq), dkv = view4<scalar_t>(dk), dvv = view4<scalar_t>(dv);
  const acc_t* lse_data = lse.data_ptr<acc_t>();
  const acc_t* grad_lse_data = grad_lse ? grad_lse->data_ptr<acc_t>() : nullptr;  // like lse, or none
  const acc_t scale = static_cast<acc_t>(p.scale);

  parallel_tasks(p.batch * p.heads_kv, order, [&](const auto& next_task) {
    SequentialBlasScope sequential_blas;
    std::vector<acc_t> q_tile(block_m * D), do_tile(block_m * D), o_tile(block_m * D), k_tile(block_n * D);
    std::vector<acc_t> v_tile(block_n * D), probs(block_m * block_n), dprobs(block_m * block_n);
    std::vector<acc_t> dq_acc(block_m * D), delta(block_m), row_lse(block_m);
    std::vector<acc_t> dk_acc(p.max_k_len() * D), dv_acc(p.max_k_len() * D);
    RowIntervals intervals;
    for (int64_t task = next_task(); task >= 0; task = next_task()) {
      const int64_t b = task / p.heads_kv, kv_h = task % p.heads_kv, tb = p.tensor_batch(b);
      const RowRange q_rows = p.q_rows(b), k_rows = p.k_rows(b);  // b's rows of q / dq and k / dk
      std::fill(dk_acc.begin(), dk_acc.begin() + k_rows.len * D, acc_t(0));
      std::fill(dv_acc.begin(), dv_acc.begin() + k_rows.len * D, acc_t(0));
      for (int64_t h = kv_h * p.group(); h < (kv_h + 1) * p.group(); ++h) {
        const acc_t slope = alibi ? static_cast<acc_t>(p.slope(b, h)) : acc_t(0);
        for (int64_t i0 = 0; i0 < q_rows.len; i0 += block_m) {
          const int64_t rows = std::min(block_m, q_rows.len - i0), row0 = q_rows.start + i0;
          visible_intervals(p, b, i0, rows, intervals);
          if (intervals.lo >= intervals.hi) {  // no row sees a key: dq is 0
            std::fill(dq_acc.begin(), dq_acc.end(), acc_t(0));
            store_rows(dq_acc.data(), rows, D, acc_t(0), no_rope, false, dqv, tb, h, row0);
            continue;
          }
          pack_rows(qv, tb, h, row0, rows, D, scale, q_rope, p.interleaved, q_tile.data());
          pack_rows(dov, tb, h, row0, rows, D, acc_t(1), no_rope, false, do_tile.data());
          pack_rows(ov, tb, h, row0, rows, D, acc_t(1), no_rope, false, o_tile.data());
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t row = (tb * p.heads_q + h) * p.seq_q + row0 + r;
            row_lse[r] = lse_data[row];
            delta[r] = at::vec::map2_reduce_all<acc_t>([](Vec<acc_t> x, Vec<acc_t> y) { return x * y; },
                                                       [](Vec<acc_t> x, Vec<acc_t> y) { return x + y; },
                                                       do_tile.data() + r * D, o_tile.data() + r * D, D);
            // A row without a visible key (lse -inf) has P = 0: its dLSE must not reach delta (0 * inf is NaN).
            if (grad_lse_data && row_lse[r] != -std::numeric_limits<acc_t>::infinity()) {
              delta[r] -= grad_lse_data[row];
            }
          }
          std::fill(dq_acc.begin(), dq_acc.end(), acc_t(0));

          for (int64_t n0 = intervals.lo; n0 < intervals.hi; n0 += block_n) {
            const int64_t cols = std::min(block_n, intervals.hi - n0);
            pack_rows(kv, tb, kv_h, k_rows.start + n0, cols, D, acc_t(1), k_rope, p.interleaved, k_tile.data());
            pack_rows(vv, tb, kv_h, k_rows.start + n0, cols, D, acc_t(1), no_rope, false, v_tile.data());
            // P = exp(S - lse) on visible entries, 0 elsewhere. S = (scale q') k'^T + bias.
            gemm<acc_t>(false, true, rows, cols, D, acc_t(1), q_tile.data(), D, k_tile.data(), D, acc_t(0),
                        probs.data(), cols);
            for (int64_t r = 0; r < rows; ++r) {
              acc_t* s = probs.data() + r * cols;
              const int64_t lo = std::clamp(intervals.rows[r].first - n0, int64_t{0}, cols);
              const int64_t hi = std::clamp(intervals.rows[r].last - n0, int64_t{0}, cols);
              if (lo >= hi) {
                std::fill(s, s + cols, acc_t(0));
                continue;
              }
              const int64_t rel0 = p.q_offset[b] + i0 + r - (p.k_offset[b] + n0);
              if (alibi) add_alibi_bias(s, lo, hi, slope, rel0);
              if (relative) add_relative_bias(s, lo, hi, p.rel_bias + h * p.rel_bias_stride_h(), p.max_distance, rel0);
              exp_row(s, cols, lo, hi, row_lse[r]);
            }
            acc_t* dv_rows = dv_acc.data() + n0 * D;
            acc_t* dk_rows = dk_acc.data() + n0 * D;
            gemm<acc_t>(true, false, cols, D, rows, acc_t(1), probs.data(), cols, do_tile.data(), D, acc_t(1),
                        dv_rows, D);  // dV += P^T dO
            gemm<acc_t>(false, true, rows, cols, D, acc_t(1), do_tile.data(), D, v_tile.data(), D, acc_t(0),
                        dprobs.data(), cols);  // dP = dO V^T
            for (int64_t r = 0; r < rows; ++r) {  // dS = P * (dP - delta), written over P
              acc_t* ds = probs.data() + r * cols;
              const acc_t* dp = dprobs.data() + r * cols;
              at::vec::map2<acc_t>([d = Vec<acc_t>(delta[r])](Vec<acc_t> pr, Vec<acc_t> g) { return pr * (g - d); },
                                   ds, ds, dp, cols);
              if (table_grad) {
                const int64_t lo = std::clamp(intervals.rows[r].first - n0, int64_t{0}, cols);
                const int64_t hi = std::clamp(intervals.rows[r].last - n0, int64_t{0}, cols);
                accumulate_relative_grad(ds, lo, hi, d_rel_partial.data() + (b * p.heads_q + h) * p.rel_bias_stride_h(),
                                         p.max_distance, p.q_offset[b] + i0 + r - (p.k_offset[b] + n0));
              }
            }
            gemm<acc_t>(false, false, rows, D, cols, acc_t(1), probs.data(), cols, k_tile.data(), D, acc_t(1),
                        dq_acc.data(), D);  // dQ' += dS K'
            gemm<acc_t>(true, false, cols, D, rows, acc_t(1), probs.data(), cols, q_tile.data(), D, acc_t(1),
                        dk_rows, D);  // dK' += dS^T (scale Q')
          }
          store_rows(dq_acc.data(), rows, D, scale, q_rope, p.interleaved, dqv, tb, h, row0);
        }
      }
      store_rows(dk_acc.data(), k_rows.len, D, acc_t(1), k_rope, p.interleaved, dkv, tb, kv_h, k_rows.start);
      store_rows(dv_acc.data(), k_rows.len, D, acc_t(1), no_rope, false, dvv, tb, kv_h, k_rows.start);
    }
  });
  if (table_grad) {
    float* d_rel = d_rel_bias.data_ptr<float>();
    const int64_t per_batch = p.heads_q * p.rel_bias_stride_h();
    for (int64_t idx = 0; idx < per_batch; ++idx) {
      acc_t sum = 0;
      for (int64_t b = 0; b < p.batch; ++b) sum += d_rel_partial[b * per_batch + idx];
      d_rel[idx] = static_cast<float>(sum);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor d_rel_bias,
    const AttentionParams& p) {
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const at::Tensor* grad_lse_ptr = grad_lse.has_value() ? &*grad_lse : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fused_pos_attn_backward_cpu", [&] {
    backward_impl<scalar_t>(grad_out, grad_lse_ptr, q, k, v, out, lse, dq, dk, dv, d_rel_bias, p);
  });
  return {dq, dk, dv, d_rel_bias};
}

}  // namespace fused_pos_attn::cpu
