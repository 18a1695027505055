// CPU decode forward: a few query rows per batch / sequence (the KV-cache decode step, Nq <= kDecodeMaxRows)
// against many keys, and every call on a paged KV cache (in chunks of kDecodeMaxRows query rows). One task per
// (batch or packed sequence, query chunk, key split):
// - a task walks its keys block by block and, per block, every kv head: the block's RoPE cos / sin rows are read
//   from memory once for all heads (per head they would cost half as much traffic again as the keys);
// - the query rows of every query head of a kv head's group (GQA) are scored together, so each key row is read,
//   converted and rotated once per kv head instead of once per query head (one GEMM per block and kv head);
// - when there are fewer batches / sequences than threads, the keys are split across tasks, each producing a
//   partial (out, row max, row sum) that a last pass merges, so every thread reads its share of the cache;
// - RoPE cos / sin of key positions come from tables kept across calls per frequency vector (cached_cos_sin:
//   the 4 most recent, at most 2^17 positions and 2 x 16 MiB each), grown as positions grow, instead of being
//   recomputed for every cached key on every call; positions outside a table are computed per call;
// - paged caches: with pages of kMinRunPage rows or more, key blocks end at page ends, so a block's rows are
//   consecutive (fp32 rows are then read in place, as in a contiguous cache); smaller pages are gathered row by
//   row (AttentionParams::key_row) while converted or rotated, their blocks spanning pages.
#include "cpu_kernels.h"
#include "gemm.h"
#include "tiles.h"

#include <algorithm>
#include <memory>
#include <mutex>

namespace fused_pos_attn::cpu {
namespace {

constexpr int64_t kDecodeBlockN = 256;           // keys per step: their RoPE tables stay in L2 across heads
constexpr int64_t kMinKeysPerSplit = 256;        // below this a split costs more to merge than it saves
constexpr int64_t kCachedPositions = 1 << 17;    // key positions [0, this) read the cached tables ...
constexpr int64_t kCachedFloats = 1 << 22;       // ... up to this many floats per cos / sin table (16 MiB)
constexpr size_t kCachedTables = 4;              // frequency vectors kept (most recently used)
constexpr int64_t kMinRunPage = 64;              // pages this large are read in page-long runs

// The positions a table for `pairs` rotation pairs may cover.
int64_t cacheable_positions(int64_t pairs) {
  return std::min(kCachedPositions, kCachedFloats / std::max<int64_t>(1, pairs));
}

// cos and sin (attention factor folded in) of every rotation pair at positions [0, size): (size, pairs) each.
struct CosSinTable {
  std::vector<float> cos, sin;
  int64_t size = 0;
};

// Per (inv_freq, attention factor): a table of positions [0, size), rebuilt larger (at least doubled, at most
// kCachedPositions) when a call needs a position past its end. Tables are immutable once built: a caller keeps
// its snapshot while another call grows the entry.
std::shared_ptr<const CosSinTable> cached_cos_sin(const float* inv_freq, int pairs, double factor, int64_t end) {
  using Key = std::pair<std::vector<float>, double>;
  static std::mutex mutex;
  static std::vector<std::pair<Key, std::shared_ptr<const CosSinTable>>> entries;  // least recently used first
  Key key{std::vector<float>(inv_freq, inv_freq + pairs), factor};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = std::find_if(entries.begin(), entries.end(), [&](const auto& e) { return e.first == key; });
  std::shared_ptr<const CosSinTable> table;
  if (it != entries.end()) {
    table = it->second;
    entries.erase(it);
  }
  if (!table || table->size < end) {
    auto grown = std::make_shared<CosSinTable>();
    grown->size = std::min(cacheable_positions(pairs), std::max(end, table ? 2 * table->size : end));
    grown->cos.resize(grown->size * pairs);
    grown->sin.resize(grown->size * pairs);
    at::parallel_for(0, grown->size, 256, [&](int64_t begin, int64_t stop) {
      std::vector<float> angle(pairs);
      for (int64_t pos = begin; pos < stop; ++pos) {
        rope_cos_sin_row(pos, inv_freq, pairs, factor, angle.data(), grown->cos.data() + pos * pairs,
                         grown->sin.data() + pos * pairs);
      }
    });
    table = grown;
  }
  entries.emplace_back(std::move(key), table);
  if (entries.size() > kCachedTables) entries.erase(entries.begin());
  return table;
}

// Keys [j0, j0 + rows) of batch b, head h, as a row-major fp32 matrix for a GEMM: the tensor's own memory for fp32
// rows with unit stride and no rotation in consecutive rows (no pages, or within one page), else gathered into
// tile (row stride D), converted and, when cos / sin are given (row j's pairs at j * pairs), rotated. Returns the
// pointer and its row stride.
template <typename scalar_t>
std::pair<const float*, int64_t> block_rows(const View4<const scalar_t>& src, int64_t b, int64_t h, int64_t j0,
                                            int64_t rows, int64_t D, const float* cos, const float* sin,
                                            const AttentionParams& p, float* tile) {
  const int64_t tb = p.k_tensor_batch(b);
  const bool consecutive = !p.paged() || j0 / p.page_size == (j0 + rows - 1) / p.page_size;
  if (std::is_same_v<scalar_t, float> && src.stride_d == 1 && !cos && consecutive) {
    return {reinterpret_cast<const float*>(src.row(tb, h, p.key_row(b, j0))), src.stride_n};
  }
  const int64_t pairs = p.rotary_dim / 2;
  if (std::is_same_v<scalar_t, float> && src.stride_d == 1 && cos) {  // fp32 rows rotated while copied: one pass
    for (int64_t j = 0; j < rows; ++j) {
      const float* x = reinterpret_cast<const float*>(src.row(tb, h, p.key_row(b, j0 + j)));
      float* y = tile + j * D;
      rotate_row_into<false>(x, y, cos + j * pairs, sin + j * pairs, p.rotary_dim, p.interleaved);
      std::copy(x + p.rotary_dim, x + D, y + p.rotary_dim);  // the columns past the rotary ones
    }
    return {tile, D};
  }
  const auto* no_tables = static_cast<const RopeTables<float>*>(nullptr);
  if (consecutive) {  // one pass over the block's rows
    pack_rows(src, tb, h, p.key_row(b, j0), rows, D, 1.0f, no_tables, false, tile);
  } else {  // rows spanning pages: gathered one by one
    for (int64_t j = 0; j < rows; ++j) {
      pack_rows(src, tb, h, p.key_row(b, j0 + j), 1, D, 1.0f, no_tables, false, tile + j * D);
    }
  }
  if (cos) {
    for (int64_t j = 0; j < rows; ++j) {
      rotate_row<false>(tile + j * D, cos + j * pairs, sin + j * pairs, p.rotary_dim, p.interleaved);
    }
  }
  return {tile, D};
}

template <typename scalar_t>
void decode_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                 const AttentionParams& p) {
  const int64_t D = p.head_dim, G = p.group(), pairs = p.rotary_dim / 2;
  const int64_t chunk_rows = std::max<int64_t>(1, std::min(kDecodeMaxRows, p.max_q_len()));
  const int64_t chunks = std::max<int64_t>(1, (p.max_q_len() + chunk_rows - 1) / chunk_rows);
  const int64_t max_rows = p.heads_q * chunk_rows;  // query rows of one task: every head's rows of one chunk
  const int64_t block_n = std::max<int64_t>(1, std::min(kDecodeBlockN, p.max_k_len()));
  if (p.batch == 0) return;  // a packed call of no sequence
  const int64_t threads = at::get_num_threads();
  // Tasks (b, query chunk, key split), each over every head: a key block's RoPE tables are read once for all heads.
  const int64_t most_splits = std::max<int64_t>(1, p.max_k_len() / kMinKeysPerSplit);
  const int64_t splits = std::clamp<int64_t>((threads + p.batch * chunks - 1) / (p.batch * chunks), 1, most_splits);
  // The query rows [i0, i0 + rows) of b's chunk c (rows <= 0: past b's rows).
  const auto chunk_of = [&](int64_t b, int64_t c) {
    return std::pair{c * chunk_rows, std::min(chunk_rows, p.q_len(b) - c * chunk_rows)};
  };
  const bool rope = p.pos == PosKind::kRope;
  std::shared_ptr<const CosSinTable> table;
  if (rope) {
    int64_t end = 0;  // past the largest key position the cache covers
    for (int64_t b = 0; b < p.batch; ++b) end = std::max(end, p.k_offset[b] + p.k_len(b));
    end = std::min(end, cacheable_positions(pairs));
    if (end > 0) table = cached_cos_sin(p.inv_freq, static_cast<int>(pairs), p.attention_factor, end);
  }
  const auto qv = view4<const scalar_t>(q), kv = view4<const scalar_t>(k), vv = view4<const scalar_t>(v);
  const auto ov = view4<scalar_t>(out);
  float* lse_data = lse.data_ptr<float>();
  const int64_t num_tasks = p.batch * chunks * splits;
  std::vector<float> partial(splits > 1 ? num_tasks * max_rows * (D + 2) : 0);  // (acc, max, sum) per task row

  // Output row r = h * nq + i of b's chunk of nq rows from i0 (query head h, row i0 + i) from its accumulator, max
  // and sum.
  const auto write_row = [&](int64_t b, int64_t i0, int64_t nq, int64_t r, const float* acc, float row_max_v,
                             float row_sum) {
    write_output_row(ov, lse_data, p, p.tensor_batch(b), r / nq, p.q_start(b) + i0 + r % nq, acc, row_max_v,
                     row_sum);
  };

  parallel_tasks(num_tasks, {}, [&](const auto& next_task) {
    SequentialBlasScope sequential_blas;
    std::vector<float> q_tile(max_rows * D), scores(G * p.max_q_len() * block_n), acc(max_rows * D);
    std::vector<float> k_tile(block_n * D), v_tile(block_n * D), row_max_v(max_rows), row_sum(max_rows);
    std::vector<float> angle(pairs + 1);
    std::vector<float> block_cos(block_n * pairs), block_sin(block_n * pairs);
    std::vector<KeyInterval> intervals;
    for (int64_t task = next_task(); task >= 0; task = next_task()) {
      const int64_t b = task / (chunks * splits), split = task % splits;
      const auto [i0, nq] = chunk_of(b, task / splits % chunks);
      if (nq <= 0) continue;
      const int64_t rows = p.heads_q * nq, tb = p.tensor_batch(b);
      const int64_t q_pos0 = p.q_offset[b] + i0;  // position of the chunk's first query row
      // Query rows r = h * nq + i (so a kv head's group is one run of G * nq rows), scaled and rotated.
      for (int64_t h = 0; h < p.heads_q; ++h) {
        pack_rows(qv, tb, h, p.q_start(b) + i0, nq, D, static_cast<float>(p.scale),
                  static_cast<const RopeTables<float>*>(nullptr), false, q_tile.data() + h * nq * D);
      }
      for (int64_t i = 0; rope && i < nq; ++i) {
        rope_cos_sin_row(q_pos0 + i, p.inv_freq, static_cast<int>(pairs), p.attention_factor, angle.data(),
                         block_cos.data(), block_sin.data());
        for (int64_t h = 0; h < p.heads_q; ++h) {
          rotate_row<false>(q_tile.data() + (h * nq + i) * D, block_cos.data(), block_sin.data(), p.rotary_dim,
                            p.interleaved);
        }
      }
      intervals.resize(nq);
      int64_t lo = p.k_len(b), hi = 0;
      for (int64_t i = 0; i < nq; ++i) {
        intervals[i] = visible_keys(q_pos0 + i, p.k_offset[b], p.k_len(b), p.causal, p.window);
        if (intervals[i].first < intervals[i].last) {
          lo = std::min(lo, intervals[i].first);
          hi = std::max(hi, intervals[i].last);
        }
      }
      const int64_t per_split = hi > lo ? (hi - lo + splits - 1) / splits : 0;
      const int64_t split_lo = std::min(hi, lo + split * per_split), split_hi = std::min(hi, split_lo + per_split);
      std::fill(row_max_v.begin(), row_max_v.begin() + rows, -std::numeric_limits<float>::infinity());
      std::fill(row_sum.begin(), row_sum.begin() + rows, 0.0f);
      std::fill(acc.begin(), acc.begin() + rows * D, 0.0f);

      for (int64_t n0 = split_lo, cols = 0; n0 < split_hi; n0 += cols) {
        cols = std::min(block_n, split_hi - n0);
        if (p.paged() && p.page_size >= kMinRunPage) cols = std::min(cols, p.page_size - n0 % p.page_size);
        const int64_t pos0 = p.k_offset[b] + n0;
        // The block's RoPE tables, read from memory once for every head: the cached rows, or computed here.
        const float* cos_block = nullptr;
        const float* sin_block = nullptr;
        if (rope && table && pos0 >= 0 && pos0 + cols <= table->size) {
          cos_block = table->cos.data() + pos0 * pairs;
          sin_block = table->sin.data() + pos0 * pairs;
        } else if (rope) {
          for (int64_t j = 0; j < cols; ++j) {
            rope_cos_sin_row(pos0 + j, p.inv_freq, static_cast<int>(pairs), p.attention_factor, angle.data(),
                             block_cos.data() + j * pairs, block_sin.data() + j * pairs);
          }
          cos_block = block_cos.data();
          sin_block = block_sin.data();
        }
        for (int64_t kv_h = 0; kv_h < p.heads_kv; ++kv_h) {
          const int64_t r0 = kv_h * G * nq, group_rows = G * nq;  // this kv head's query rows
          const auto [k_ptr, ldk] = block_rows(kv, b, kv_h, n0, cols, D, cos_block, sin_block, p, k_tile.data());
          gemm<float>(false, true, group_rows, cols, D, 1.0f, q_tile.data() + r0 * D, D, k_ptr, ldk, 0.0f,
                      scores.data(), cols);
          for (int64_t r = 0; r < group_rows; ++r) {
            const int64_t i = r % nq, h = kv_h * G + r / nq;
            float* s = scores.data() + r * cols;
            const int64_t row_lo = std::clamp(intervals[i].first - n0, int64_t{0}, cols);
            const int64_t row_hi = std::clamp(intervals[i].last - n0, int64_t{0}, cols);
            if (row_lo >= row_hi) {
              std::fill(s, s + cols, 0.0f);
              continue;
            }
            const float slope = p.pos == PosKind::kAlibi ? p.slope(b, h) : 0.0f;
            const int64_t rel0 = q_pos0 + i - (p.k_offset[b] + n0);
            softmax_block_row(p, h, slope, s, cols, row_lo, row_hi, rel0, row_max_v[r0 + r], row_sum[r0 + r],
                              acc.data() + (r0 + r) * D, D);
          }
          const auto [v_ptr, ldv] = block_rows(vv, b, kv_h, n0, cols, D, nullptr, nullptr, p, v_tile.data());
          gemm<float>(false, false, group_rows, D, cols, 1.0f, scores.data(), cols, v_ptr, ldv, 1.0f,
                      acc.data() + r0 * D, D);
        }
      }
      if (splits == 1) {
        for (int64_t r = 0; r < rows; ++r) write_row(b, i0, nq, r, acc.data() + r * D, row_max_v[r], row_sum[r]);
        continue;
      }
      float* part = partial.data() + task * max_rows * (D + 2);
      for (int64_t r = 0; r < rows; ++r) {
        std::copy(acc.data() + r * D, acc.data() + (r + 1) * D, part + r * (D + 2));
        part[r * (D + 2) + D] = row_max_v[r];
        part[r * (D + 2) + D + 1] = row_sum[r];
      }
    }
  });
  if (splits == 1) return;
  // Merge the splits of each (batch / sequence, chunk): rescale every split's partial to the common max, sum them.
  at::parallel_for(0, p.batch * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / chunks;
      const auto [i0, nq] = chunk_of(b, bc % chunks);
      for (int64_t r = 0; r < p.heads_q * nq; ++r) {
        const auto part = [&](int64_t s) { return partial.data() + ((bc * splits + s) * max_rows + r) * (D + 2); };
        float m = -std::numeric_limits<float>::infinity(), sum = 0.0f;
        for (int64_t s = 0; s < splits; ++s) m = std::max(m, part(s)[D]);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t s = 0; s < splits; ++s) {
          if (part(s)[D + 1] == 0.0f) continue;  // no visible key in this split
          const float w = std::exp(part(s)[D] - m);
          sum += part(s)[D + 1] * w;
          for (int64_t d = 0; d < D; ++d) acc[d] += part(s)[d] * w;
        }
        write_row(b, i0, nq, r, acc.data(), m, sum);
      }
    }
  });
}

}  // namespace

bool uses_decode_path(const at::Tensor& q, const AttentionParams& p) {
  return q.scalar_type() != at::kDouble && (p.max_q_len() <= kDecodeMaxRows || p.paged());
}

void attention_decode_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                              at::Tensor& lse, const AttentionParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fused_pos_attn_decode_cpu",
                                  [&] { decode_impl<scalar_t>(q, k, v, out, lse, p); });
}

}  // namespace fused_pos_attn::cpu
