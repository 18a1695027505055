// Building blocks of the CPU attention kernels: strided views, RoPE tables, tile packing (with the
// rotation applied as a tile is loaded) and vectorized softmax rows. Tiles are row-major acc_t buffers
// with row stride D; a per-thread tile never exceeds kBlockM x kBlockN scores.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2)
#include <sleef.h>  // libtorch_cpu exports SLEEF: the same vector cos/sin torch.cos / torch.sin use
#endif

#include "fused_pos_attn/attention_params.h"

namespace fused_pos_attn::cpu {

constexpr int64_t kBlockM = 128;  // query rows per task: amortizes packing / rotating each key tile
constexpr int64_t kBlockN = 256;  // keys per step: big enough for BLAS, small enough for L2

// A (B, H, N, D) tensor with arbitrary strides (in elements).
template <typename T>
struct View4 {
  T* data;
  int64_t stride_b, stride_h, stride_n, stride_d;
  T* row(int64_t b, int64_t h, int64_t n) const { return data + b * stride_b + h * stride_h + n * stride_n; }
};

template <typename T>
View4<T> view4(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// RoPE cos and sin of every rotation pair (attention factor folded in) for the rows of a (B, H, N, D) tensor,
// laid out (B, N, rotary_dim / 2): half the size of per-column tables. Row n of batch / sequence b's rows
// (AttentionParams::q_rows / k_rows, which locate them in the tensor) sits at position offset[b] + n.
template <typename acc_t>
struct RopeTables {
  std::vector<acc_t> cos, sin;
  int64_t seq = 0;  // N of the tensor
  int rotary_dim = 0;
  // The tables of row n (along N) of tensor batch tb.
  const acc_t* cos_row(int64_t tb, int64_t n) const { return cos.data() + (tb * seq + n) * (rotary_dim / 2); }
  const acc_t* sin_row(int64_t tb, int64_t n) const { return sin.data() + (tb * seq + n) * (rotary_dim / 2); }
};

// cos and sin of fp32 angles x[0, n), as torch computes them for fp32 tensors (SLEEF's 1-ULP vector
// functions on AVX2): a decode step rotates every cached key, so these dominate its table cost.
inline void cos_sin_fp32(const float* x, int64_t n, float* cos_out, float* sin_out) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX2)
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    _mm256_storeu_ps(cos_out + i, Sleef_cosf8_u10(v));
    _mm256_storeu_ps(sin_out + i, Sleef_sinf8_u10(v));
  }
#endif
  for (; i < n; ++i) {
    cos_out[i] = std::cos(x[i]);
    sin_out[i] = std::sin(x[i]);
  }
}

// cos and sin (times the attention factor) of every rotation pair at position pos: pairs values each, fp32
// angles as position.h's rope_angle computes them. The one place the CPU kernels' RoPE table entries come from.
inline void rope_cos_sin_row(int64_t pos, const float* inv_freq, int pairs, double attention_factor, float* angle,
                             float* cos_out, float* sin_out) {
  for (int pair = 0; pair < pairs; ++pair) angle[pair] = rope_angle(pos, inv_freq[pair]);
  cos_sin_fp32(angle, pairs, cos_out, sin_out);
  const float factor = static_cast<float>(attention_factor);
  for (int pair = 0; pair < pairs; ++pair) {
    cos_out[pair] *= factor;
    sin_out[pair] *= factor;
  }
}

// The tables of q's rows (keys false) or k's rows (keys true).
template <typename acc_t>
RopeTables<acc_t> make_rope_tables(const AttentionParams& p, bool keys) {
  RopeTables<acc_t> t;
  t.seq = keys ? p.seq_k : p.seq_q;
  t.rotary_dim = p.rotary_dim;
  const int pairs = p.rotary_dim / 2;
  const int64_t* offset = keys ? p.k_offset : p.q_offset;
  const int64_t max_len = keys ? p.max_k_len() : p.max_q_len();  // rows per batch / sequence, at most
  t.cos.resize(p.tensor_batches() * t.seq * pairs);
  t.sin.resize(p.tensor_batches() * t.seq * pairs);
  at::parallel_for(0, p.batch * max_len, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> angle(pairs);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / max_len, n = idx % max_len;
      const RowRange rows = keys ? p.k_rows(b) : p.q_rows(b);
      if (n >= rows.len) continue;
      const int64_t pos = offset[b] + n;
      const int64_t row = p.tensor_batch(b) * t.seq + rows.start + n;
      acc_t* cos_row = t.cos.data() + row * pairs;
      acc_t* sin_row = t.sin.data() + row * pairs;
      if constexpr (std::is_same_v<acc_t, float>) {
        rope_cos_sin_row(pos, p.inv_freq, pairs, p.attention_factor, angle.data(), cos_row, sin_row);
      } else {  // fp64 (gradcheck): cos / sin of the fp32 angle in double
        for (int pair = 0; pair < pairs; ++pair) {
          const double angle_d = rope_angle(pos, p.inv_freq[pair]);
          cos_row[pair] = static_cast<acc_t>(p.attention_factor * std::cos(angle_d));
          sin_row[pair] = static_cast<acc_t>(p.attention_factor * std::sin(angle_d));
        }
      }
    }
  });
  return t;
}

// Builds the q and k tables of a call into q and k; returns true when k shares q's table (every batch /
// sequence has its keys on its query rows, at the same positions, as in self-attention), in which case k is
// left empty.
template <typename acc_t>
bool make_qk_rope_tables(const AttentionParams& p, RopeTables<acc_t>& q, RopeTables<acc_t>& k) {
  q = make_rope_tables<acc_t>(p, false);
  bool shared = p.seq_q == p.seq_k;
  for (int64_t b = 0; shared && b < p.batch; ++b) {
    const RowRange q_rows = p.q_rows(b), k_rows = p.k_rows(b);
    shared = p.q_offset[b] == p.k_offset[b] && q_rows.start == k_rows.start && q_rows.len == k_rows.len;
  }
  if (!shared) k = make_rope_tables<acc_t>(p, true);
  return shared;
}

// Rotate the first rotary_dim entries of row x into y (which may be x: in place); cos, sin: rotary_dim / 2
// per-pair values. TRANSPOSED applies the inverse rotation (angle -> -angle), which maps gradients w.r.t.
// rotated rows back to the original rows. Pairs are (d, d + r/2) (rotate-half) or (2p, 2p + 1) (interleaved),
// as position.h's rope_column defines them: y[first] = x[first] c - x[second] s, y[second] = x[second] c +
// x[first] s. Entries past rotary_dim are not touched.
template <bool TRANSPOSED, typename acc_t>
void rotate_row_into(const acc_t* x, acc_t* y, const acc_t* cos, const acc_t* sin, int rotary_dim, bool interleaved) {
  const int pairs = rotary_dim / 2;
  const int stride = interleaved ? 2 : 1;            // distance between the first members of two pairs
  const int partner = interleaved ? 1 : pairs;       // offset of a pair's second member from its first
  int pair = 0;
  if (!interleaved) {  // rotate-half: the two members of consecutive pairs are contiguous runs
    using V = at::vec::Vectorized<acc_t>;
    for (; pair + V::size() <= pairs; pair += V::size()) {
      const V a = V::loadu(x + pair), b = V::loadu(x + pair + pairs), c = V::loadu(cos + pair);
      const V s = TRANSPOSED ? V(acc_t(0)) - V::loadu(sin + pair) : V::loadu(sin + pair);
      (a * c - b * s).store(y + pair);
      (b * c + a * s).store(y + pair + pairs);
    }
  }
  for (; pair < pairs; ++pair) {
    const int first = pair * stride;
    const acc_t a = x[first], b = x[first + partner];
    const acc_t s = TRANSPOSED ? -sin[pair] : sin[pair];
    y[first] = a * cos[pair] - b * s;
    y[first + partner] = b * cos[pair] + a * s;
  }
}

// rotate_row_into in place.
template <bool TRANSPOSED, typename acc_t>
void rotate_row(acc_t* x, const acc_t* cos, const acc_t* sin, int rotary_dim, bool interleaved) {
  rotate_row_into<TRANSPOSED>(x, x, cos, sin, rotary_dim, interleaved);
}

// Copy rows [n0, n0 + rows) of head (b, h) into a contiguous acc_t tile (row stride D), times mult,
// rotated at their positions when rope is given. Here and below b is the tensor's batch index and n0 a row
// of the tensor (AttentionParams::tensor_batch, q_rows / k_rows locate a sequence's rows).
template <typename scalar_t, typename acc_t>
void pack_rows(const View4<const scalar_t>& src, int64_t b, int64_t h, int64_t n0, int64_t rows, int64_t head_dim,
               acc_t mult, const RopeTables<acc_t>* rope, bool interleaved, acc_t* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* x = src.row(b, h, n0 + i);
    acc_t* y = dst + i * head_dim;
    if (src.stride_d == 1) {  // the common layout: a unit-stride loop the compiler vectorizes
      for (int64_t d = 0; d < head_dim; ++d) y[d] = static_cast<acc_t>(x[d]) * mult;
    } else {
      for (int64_t d = 0; d < head_dim; ++d) y[d] = static_cast<acc_t>(x[d * src.stride_d]) * mult;
    }
    if (rope) rotate_row<false>(y, rope->cos_row(b, n0 + i), rope->sin_row(b, n0 + i), rope->rotary_dim, interleaved);
  }
}

// Rows [n0, n0 + rows) of head (b, h) as a row-major acc_t matrix for a GEMM: the tensor's own memory
// when in_place (acc_t rows with unit stride and no rotation), else packed into tile. Returns the pointer
// and its row stride.
template <typename scalar_t, typename acc_t>
std::pair<const acc_t*, int64_t> gemm_rows(const View4<const scalar_t>& src, bool in_place, int64_t b, int64_t h,
                                           int64_t n0, int64_t rows, int64_t head_dim, const RopeTables<acc_t>* rope,
                                           bool interleaved, acc_t* tile) {
  if (in_place) return {reinterpret_cast<const acc_t*>(src.row(b, h, n0)), src.stride_n};
  pack_rows(src, b, h, n0, rows, head_dim, acc_t(1), rope, interleaved, tile);
  return {tile, head_dim};
}

// Output row `row` of head (tb, h) and its LSE (in lse, the (B, Hq, Nq) LSE's data) from an unnormalized
// accumulator acc (D values), the row's score max and sum of exponentials: out = acc / sum, lse = max + log(sum);
// a row with no visible key (sum 0) gets out 0 and lse -inf.
template <typename scalar_t, typename acc_t>
void write_output_row(const View4<scalar_t>& out, acc_t* lse, const AttentionParams& p, int64_t tb, int64_t h,
                      int64_t row, const acc_t* acc, acc_t row_max, acc_t row_sum) {
  const bool empty = row_sum == acc_t(0);
  const acc_t inv = empty ? acc_t(0) : acc_t(1) / row_sum;
  scalar_t* o = out.row(tb, h, row);
  for (int64_t d = 0; d < p.head_dim; ++d) o[d * out.stride_d] = static_cast<scalar_t>(acc[d] * inv);
  lse[(tb * p.heads_q + h) * p.seq_q + row] =
      empty ? -std::numeric_limits<acc_t>::infinity() : row_max + std::log(row_sum);
}

// Write acc_t rows (row stride D) to rows [n0, n0 + rows) of head (b, h), times mult, rotated back
// (transposed rotation) when rope is given. Used for dq, dk, dv.
template <typename scalar_t, typename acc_t>
void store_rows(acc_t* src, int64_t rows, int64_t head_dim, acc_t mult, const RopeTables<acc_t>* rope,
                bool interleaved, const View4<scalar_t>& dst, int64_t b, int64_t h, int64_t n0) {
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* x = src + i * head_dim;
    if (rope) rotate_row<true>(x, rope->cos_row(b, n0 + i), rope->sin_row(b, n0 + i), rope->rotary_dim, interleaved);
    scalar_t* y = dst.row(b, h, n0 + i);
    for (int64_t d = 0; d < head_dim; ++d) y[d * dst.stride_d] = static_cast<scalar_t>(x[d] * mult);
  }
}

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

template <typename acc_t>
Vec<acc_t> vec_exp(const Vec<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// s[j] += -slope * |rel0 - j| for j in [lo, hi): the ALiBi bias of a score row whose column 0 sits at
// relative distance rel0 = pq(i) - pk(n0) (clamped as in position.h).
template <typename acc_t>
void add_alibi_bias(acc_t* s, int64_t lo, int64_t hi, acc_t slope, int64_t rel0) {
  const acc_t base = static_cast<acc_t>(clamp_rel(rel0));
  const Vec<acc_t> neg_slope(-slope), vbase(base);
  int64_t j = lo;
  for (; j + Vec<acc_t>::size() <= hi; j += Vec<acc_t>::size()) {
    const Vec<acc_t> cols = Vec<acc_t>::arange(static_cast<acc_t>(j), acc_t(1));
    (Vec<acc_t>::loadu(s + j) + neg_slope * (vbase - cols).abs()).store(s + j);
  }
  for (; j < hi; ++j) s[j] += -slope * std::abs(base - static_cast<acc_t>(j));
}

// A score row's columns [lo, hi) split by the relative bias table's three parts: rel = rel0 - j runs down
// from rel0 = pq(i) - pk(n0), and the table is constant for rel >= max_distance (columns [lo, near_lo)) and
// for rel <= -max_distance ([near_hi, hi)); only the band between has per-distance entries.
struct RelativeBands {
  int64_t near_lo, near_hi;
};

inline RelativeBands relative_bands(int64_t lo, int64_t hi, int64_t max_distance, int64_t rel0) {
  const int64_t rel = clamp_rel(rel0);  // keeps the band arithmetic in range; a clamped row is all far
  return {std::clamp(rel - max_distance + 1, lo, hi), std::clamp(rel + max_distance, lo, hi)};
}

// s[j] += rel_bias_h[relative_bias_index(rel0 - j)] for j in [lo, hi): the relative bias of a score row;
// rel_bias_h is one head's (2, max_distance + 1) table.
template <typename acc_t>
void add_relative_bias(acc_t* s, int64_t lo, int64_t hi, const float* rel_bias_h, int64_t max_distance,
                       int64_t rel0) {
  const RelativeBands band = relative_bands(lo, hi, max_distance, rel0);
  const acc_t before = rel_bias_h[relative_bias_index(max_distance, max_distance)];
  const acc_t after = rel_bias_h[relative_bias_index(-max_distance, max_distance)];
  for (int64_t j = lo; j < band.near_lo; ++j) s[j] += before;
  for (int64_t j = band.near_lo; j < band.near_hi; ++j) {
    s[j] += static_cast<acc_t>(rel_bias_h[relative_bias_index(rel0 - j, max_distance)]);
  }
  for (int64_t j = band.near_hi; j < hi; ++j) s[j] += after;
}

// d_rel_bias_h[relative_bias_index(rel0 - j)] += ds[j] for j in [lo, hi): the relative table's gradient.
template <typename acc_t>
void accumulate_relative_grad(const acc_t* ds, int64_t lo, int64_t hi, acc_t* d_rel_bias_h, int64_t max_distance,
                              int64_t rel0) {
  const RelativeBands band = relative_bands(lo, hi, max_distance, rel0);
  const auto sum = [ds](int64_t begin, int64_t end) {
    return end > begin ? at::vec::reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return a + b; }, ds + begin,
                                                    end - begin)
                       : acc_t(0);
  };
  d_rel_bias_h[relative_bias_index(max_distance, max_distance)] += sum(lo, band.near_lo);
  for (int64_t j = band.near_lo; j < band.near_hi; ++j) {
    d_rel_bias_h[relative_bias_index(rel0 - j, max_distance)] += ds[j];
  }
  d_rel_bias_h[relative_bias_index(-max_distance, max_distance)] += sum(band.near_hi, hi);
}

template <typename acc_t>
acc_t row_max(const acc_t* s, int64_t lo, int64_t hi) {
  return at::vec::reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return at::vec::maximum(a, b); }, s + lo,
                                    hi - lo);
}

// s[j] = exp(s[j] - shift) on [lo, hi) and 0 elsewhere in [0, cols); returns the sum.
template <typename acc_t>
acc_t exp_row(acc_t* s, int64_t cols, int64_t lo, int64_t hi, acc_t shift) {
  std::fill(s, s + lo, acc_t(0));
  std::fill(s + hi, s + cols, acc_t(0));
  const Vec<acc_t> vshift(shift);
  Vec<acc_t> vsum(acc_t(0));
  int64_t j = lo;
  for (; j + Vec<acc_t>::size() <= hi; j += Vec<acc_t>::size()) {
    const Vec<acc_t> e = vec_exp<acc_t>(Vec<acc_t>::loadu(s + j) - vshift);
    e.store(s + j);
    vsum += e;
  }
  acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return a + b; }, vsum);
  for (; j < hi; ++j) {
    s[j] = std::exp(s[j] - shift);
    sum += s[j];
  }
  return sum;
}

// One query row's scores s[0, cols) against a key block in the online softmax: adds the position bias of head h
// (slope: its ALiBi slope) on the visible columns [lo, hi), exponentiates them against the updated running max
// (row_max, row_sum) and rescales the row's output accumulator acc_row (D values); the other columns become 0.
// rel0 = pq(row) - pk(column 0). Requires lo < hi.
template <typename acc_t>
void softmax_block_row(const AttentionParams& p, int64_t h, acc_t slope, acc_t* s, int64_t cols, int64_t lo,
                       int64_t hi, int64_t rel0, acc_t& row_max_v, acc_t& row_sum, acc_t* acc_row, int64_t D) {
  if (p.pos == PosKind::kAlibi) add_alibi_bias(s, lo, hi, slope, rel0);
  if (p.pos == PosKind::kRelative) {
    add_relative_bias(s, lo, hi, p.rel_bias + h * p.rel_bias_stride_h(), p.max_distance, rel0);
  }
  const acc_t m_new = std::max(row_max_v, row_max(s, lo, hi));
  const acc_t alpha = std::exp(row_max_v - m_new);  // 0 when the row had no key before
  const acc_t sum = exp_row(s, cols, lo, hi, m_new);
  row_sum = row_sum * alpha + sum;
  row_max_v = m_new;
  if (alpha != acc_t(1)) {
    for (int64_t d = 0; d < D; ++d) acc_row[d] *= alpha;
  }
}

// Visible key interval [first, last) of each query row of a block, and the union over the block.
struct RowIntervals {
  std::vector<KeyInterval> rows;
  int64_t lo = 0, hi = 0;  // union; lo == hi when no row sees any key
};

// Rows [i0, i0 + rows) of batch / sequence b (indices within its rows, like its keys').
inline void visible_intervals(const AttentionParams& p, int64_t b, int64_t i0, int64_t rows, RowIntervals& out) {
  const int64_t seq_k = p.k_len(b);
  out.rows.resize(rows);
  out.lo = seq_k;
  out.hi = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const KeyInterval iv = visible_keys(p.q_offset[b] + i0 + r, p.k_offset[b], seq_k, p.causal, p.window);
    out.rows[r] = iv;
    if (iv.first < iv.last) {
      out.lo = std::min(out.lo, iv.first);
      out.hi = std::max(out.hi, iv.last);
    }
  }
  if (out.lo >= out.hi) out.lo = out.hi = 0;
}

// Runs body(next) once per worker of at::parallel_for (each with its own buffers); next() hands out task
// indices [0, num_tasks) from a shared counter, in the order given by order (a permutation, or empty for
// 0, 1, ...), and -1 when none is left. Workers take the next task when they finish one, so tasks of very
// different costs (the sequences of a packed call) stay balanced over the threads, which at::parallel_for's
// equal contiguous chunks would not.
template <typename Body>
void parallel_tasks(int64_t num_tasks, const std::vector<int64_t>& order, const Body& body) {
  if (num_tasks <= 0) return;
  std::atomic<int64_t> counter{0};
  const auto next = [&]() -> int64_t {
    const int64_t i = counter.fetch_add(1, std::memory_order_relaxed);
    return i >= num_tasks ? -1 : (order.empty() ? i : order[i]);
  };
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { body(next); });
}

}  // namespace fused_pos_attn::cpu
