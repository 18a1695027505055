// Host harness for tests/test_cuda_emulated.py: launches the kernel templates of csrc/cuda/forward_kernel.cuh
// and backward_kernel.cuh block by block on emulated threads (emu_runtime.h), with the grids and workspace
// initialization of the launchers in attention_forward.cu / attention_backward.cu (and their choice of
// cp.async or element copies, allows_cp_async). C entry points for ctypes;
// arguments follow the op schema of csrc/ops.cpp.
#include <functional>
#include <thread>
#include <type_traits>
#include <vector>

#include "cuda/backward_kernel.cuh"
#include "cuda/forward_kernel.cuh"

namespace fused_pos_attn::gpu {
alignas(16) unsigned char smem[1 << 17];  // the kernels' `extern __shared__` array; blocks run one at a time
}

using namespace fused_pos_attn;
using namespace fused_pos_attn::gpu;

namespace {

void run_grid(emu::Dim grid, const std::function<void()>& kernel) {
  emu::grid_dim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        memset(smem, 0xff, sizeof(smem));  // NaN garbage: reading shared memory never written shows up
        std::barrier<> block_barrier(kThreads);
        std::vector<emu::Warp> warps(kThreads / kWarpSize);
        std::vector<std::thread> threads;
        for (int tid = 0; tid < kThreads; ++tid) {
          threads.emplace_back([&, tid] {
            emu::thread_idx = {static_cast<unsigned>(tid), 0, 0};
            emu::block_idx = {x, y, z};
            emu::warp = &warps[tid / kWarpSize];
            emu::lane = tid % kWarpSize;
            emu::block_bar = &block_barrier;
            kernel();
          });
        }
        for (auto& t : threads) t.join();
      }
}

AttentionParams make_params(const int64_t* shape, const int64_t* q_offset, const int64_t* k_offset, int pos,
                            const float* slopes, const int64_t* slope_strides, const float* inv_freq, int rotary_dim,
                            int interleaved, double attention_factor, const float* rel_bias, int64_t max_distance,
                            int causal, int64_t window, double scale) {
  AttentionParams p;
  p.batch = shape[0], p.heads_q = shape[1], p.heads_kv = shape[2], p.seq_q = shape[3], p.seq_k = shape[4];
  p.head_dim = shape[5];
  p.q_offset = q_offset, p.k_offset = k_offset, p.pos = static_cast<PosKind>(pos);
  p.slopes = slopes, p.slope_stride_b = slope_strides[0], p.slope_stride_h = slope_strides[1];
  p.inv_freq = inv_freq, p.rotary_dim = rotary_dim, p.interleaved = interleaved;
  p.attention_factor = attention_factor, p.rel_bias = rel_bias, p.max_distance = max_distance;
  p.causal = causal, p.window = window, p.scale = scale;
  return p;
}

// f(T*, integral_constant<int, D>) for dtype 0 = fp16, 1 = bf16 and D = 64 / 128.
template <typename F>
void dispatch(int dtype, int64_t head_dim, F f) {
  auto with_dim = [&](auto* t) {
    if (head_dim == 64) f(t, std::integral_constant<int, 64>{});
    else f(t, std::integral_constant<int, 128>{});
  };
  if (dtype == 0) with_dim(static_cast<__half*>(nullptr));
  else with_dim(static_cast<__nv_bfloat16*>(nullptr));
}

Tensor4 tensor4(void* data, const int64_t* strides) { return Tensor4{data, strides[0], strides[1], strides[2]}; }

}  // namespace

#define EMU_PARAMS                                                                                              \
  int dtype, const int64_t *shape, const int64_t *q_offset, const int64_t *k_offset, int pos,       \
      const float *slopes, const int64_t *slope_strides, const float *inv_freq, int rotary_dim, int interleaved, \
      double attention_factor, const float *rel_bias, int64_t max_distance, int causal, int64_t window, double scale
#define EMU_MAKE_PARAMS                                                                                         \
  make_params(shape, q_offset, k_offset, pos, slopes, slope_strides, inv_freq, rotary_dim, interleaved,        \
              attention_factor, rel_bias, max_distance, causal, window, scale)

extern "C" void emu_forward(EMU_PARAMS, void* q, const int64_t* q_strides, void* k, const int64_t* k_strides,
                            void* v, const int64_t* v_strides, void* out, const int64_t* out_strides, float* lse) {
  const AttentionParams p = EMU_MAKE_PARAMS;
  check_grid(p);
  const Tensor4 q4 = tensor4(q, q_strides), k4 = tensor4(k, k_strides), v4 = tensor4(v, v_strides);
  const ForwardArgs args{q4, k4, v4, tensor4(out, out_strides), lse,
                         allows_cp_async(q4) && allows_cp_async(k4) && allows_cp_async(v4)};
  dispatch(dtype, p.head_dim, [&](auto* t, auto head_dim) {
    using T = std::remove_pointer_t<decltype(t)>;
    constexpr int kHeadDim = decltype(head_dim)::value;
    using Cfg = ForwardConfig<kHeadDim>;
    const emu::Dim grid{static_cast<unsigned>((p.seq_q + Cfg::kBlockM - 1) / Cfg::kBlockM),
                        static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch)};
    run_grid(grid, [&] { attention_forward_kernel<T, kHeadDim>(p, args); });
  });
}

extern "C" void emu_backward(EMU_PARAMS, void* grad_out, const int64_t* grad_out_strides, void* q,
                             const int64_t* q_strides, void* k, const int64_t* k_strides, void* v,
                             const int64_t* v_strides, void* out, const int64_t* out_strides, const float* lse,
                             void* dq, const int64_t* dq_strides, void* dk, const int64_t* dk_strides, void* dv,
                             const int64_t* dv_strides, float* d_rel_bias, float* dq_accum, float* delta) {
  const AttentionParams p = EMU_MAKE_PARAMS;
  check_grid(p);
  const Tensor4 do4 = tensor4(grad_out, grad_out_strides), q4 = tensor4(q, q_strides), k4 = tensor4(k, k_strides);
  const Tensor4 v4 = tensor4(v, v_strides);
  const bool vec16 = allows_cp_async(do4) && allows_cp_async(q4) && allows_cp_async(k4) && allows_cp_async(v4);
  const BackwardArgs args{do4, q4, k4, v4, tensor4(dk, dk_strides), tensor4(dv, dv_strides),
                          lse, delta, dq_accum, d_rel_bias, vec16};
  const Tensor4 out4 = tensor4(out, out_strides), dq4 = tensor4(dq, dq_strides);
  dispatch(dtype, p.head_dim, [&](auto* t, auto head_dim) {
    using T = std::remove_pointer_t<decltype(t)>;
    constexpr int kHeadDim = decltype(head_dim)::value;
    using Cfg = BackwardConfig<kHeadDim>;
    memset(dq_accum, 0, sizeof(float) * p.batch * p.heads_q * p.seq_q * kHeadDim);
    if (p.pos == PosKind::kRelative) memset(d_rel_bias, 0, sizeof(float) * p.heads_q * 2 * (p.max_distance + 1));
    run_grid({3, 1, 1}, [&] { attention_backward_preprocess_kernel<T>(p, args.grad_out, out4, delta); });
    const emu::Dim grid{static_cast<unsigned>((p.seq_k + Cfg::kBlockN - 1) / Cfg::kBlockN),
                        static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(p.batch)};
    run_grid(grid, [&] { attention_backward_dkdv_kernel<T, kHeadDim>(p, args); });
    run_grid({5, 1, 1}, [&] { attention_backward_dq_kernel<T>(p, dq_accum, dq4); });
  });
}
