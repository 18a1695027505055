// CPU attention backward (FlashAttention-2): one task per (batch, kv head) owns that head's dK / dV
// (accumulated over its query-head group, so no atomics and a deterministic result) and the dQ of
// every query head of the group. Scores are recomputed from q, k and the saved LSE; a gradient of the LSE
// enters through delta = rowsum(dO * O) - dLSE (dS = P * (dP - delta)). The relative bias table's gradient
// is summed per (batch, head) in a fixed order, then over the batch: deterministic.
#include "cpu_kernels.h"
#include "gemm.h"
#include "tiles.h"

namespace fused_pos_attn::cpu {
namespace {

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_out, const at::Tensor* grad_lse, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dv, at::Tensor& d_rel_bias, const AttentionParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = p.head_dim;
  const int64_t block_m = std::min(kBlockM, p.seq_q), block_n = std::min(kBlockN, p.seq_k);
  const bool rope = p.pos == PosKind::kRope, alibi = p.pos == PosKind::kAlibi;
  const bool relative = p.pos == PosKind::kRelative;
  const bool table_grad = relative && d_rel_bias.numel() > 0;
  // (B, Hq, 2 * (max_distance + 1)) per-batch partial sums of the relative table's gradient.
  std::vector<acc_t> d_rel_partial(table_grad ? p.batch * p.heads_q * p.rel_bias_stride_h() : 0, acc_t(0));
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
  const acc_t* grad_lse_data = grad_lse ? grad_lse->data_ptr<acc_t>() : nullptr;  // (B, Hq, Nq) or none
  const acc_t scale = static_cast<acc_t>(p.scale);

  at::parallel_for(0, p.batch * p.heads_kv, 1, [&](int64_t begin, int64_t end) {
    SequentialBlasScope sequential_blas;
    std::vector<acc_t> q_tile(block_m * D), do_tile(block_m * D), o_tile(block_m * D), k_tile(block_n * D);
    std::vector<acc_t> v_tile(block_n * D), probs(block_m * block_n), dprobs(block_m * block_n);
    std::vector<acc_t> dq_acc(block_m * D), delta(block_m), row_lse(block_m);
    std::vector<acc_t> dk_acc(p.seq_k * D), dv_acc(p.seq_k * D);
    RowIntervals intervals;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.heads_kv, kv_h = task % p.heads_kv;
      std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
      std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
      for (int64_t h = kv_h * p.group(); h < (kv_h + 1) * p.group(); ++h) {
        const acc_t slope = alibi ? static_cast<acc_t>(p.slope(b, h)) : acc_t(0);
        for (int64_t i0 = 0; i0 < p.seq_q; i0 += block_m) {
          const int64_t rows = std::min(block_m, p.seq_q - i0);
          visible_intervals(p, b, i0, rows, intervals);
          if (intervals.lo >= intervals.hi) {  // no row sees a key: dq is 0
            std::fill(dq_acc.begin(), dq_acc.end(), acc_t(0));
            store_rows(dq_acc.data(), rows, D, acc_t(0), no_rope, false, dqv, b, h, i0);
            continue;
          }
          pack_rows(qv, b, h, i0, rows, D, scale, q_rope, p.interleaved, q_tile.data());
          pack_rows(dov, b, h, i0, rows, D, acc_t(1), no_rope, false, do_tile.data());
          pack_rows(ov, b, h, i0, rows, D, acc_t(1), no_rope, false, o_tile.data());
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t row = (b * p.heads_q + h) * p.seq_q + i0 + r;
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
            pack_rows(kv, b, kv_h, n0, cols, D, acc_t(1), k_rope, p.interleaved, k_tile.data());
            pack_rows(vv, b, kv_h, n0, cols, D, acc_t(1), no_rope, false, v_tile.data());
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
          store_rows(dq_acc.data(), rows, D, scale, q_rope, p.interleaved, dqv, b, h, i0);
        }
      }
      store_rows(dk_acc.data(), p.seq_k, D, acc_t(1), k_rope, p.interleaved, dkv, b, kv_h, 0);
      store_rows(dv_acc.data(), p.seq_k, D, acc_t(1), no_rope, false, dvv, b, kv_h, 0);
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
