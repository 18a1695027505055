// Host harness for tests/test_cuda_emulated.py: launches the kernel templates of csrc/cuda/forward_kernel.cuh
// and backward_kernel.cuh block by block on emulated threads (emu_runtime.h), with the grids, decode plans and
// workspace initialization of the launchers in attention_forward.cu / attention_backward.cu (and their choice of
// cp.async or element copies, allows_cp_async). C entry points for ctypes; the op's position and masking
// arguments arrive as an EmuArg array in FPA_CALL_ARGS order (the op schema's), the rest as pointers and strides.
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

// One op argument as ctypes passes it (test_cuda_emulated.EmuArg): a tensor (data pointer, up to 4 strides and
// sizes), an int or bool, or a float.
struct HostTensor {
  void* data;
  int64_t strides[4];
  int64_t sizes[4];
  template <typename T>
  T* data_ptr() const { return static_cast<T*>(data); }
  int64_t stride(int dim) const { return strides[dim]; }
  int64_t size(int dim) const { return sizes[dim]; }
};
struct EmuArg {
  HostTensor tensor;
  int64_t integer;
  double real;
};

// The op's position and masking arguments (attention_params.h's FPA_CALL_ARGS), one member per entry.
#define EMU_TYPE_Tensor HostTensor
#define EMU_TYPE_int int64_t
#define EMU_TYPE_bool bool
#define EMU_TYPE_float double
#define EMU_MEMBER(schema_type, name, field_type) EMU_TYPE_##schema_type name;
struct EmuCallArgs {
  FPA_CALL_ARGS(EMU_MEMBER)
};

void unpack(const EmuArg& a, HostTensor& t) { t = a.tensor; }
void unpack(const EmuArg& a, int64_t& i) { i = a.integer; }
void unpack(const EmuArg& a, bool& b) { b = a.integer != 0; }
void unpack(const EmuArg& a, double& x) { x = a.real; }

// AttentionParams from the tensors' shapes (B, Hq, Hkv, Nq, Nk, D) and the op arguments in FPA_CALL_ARGS order,
// filled as ops.cpp fills them (fill_call_args, which also sets the packed layout and its batch S).
AttentionParams make_params(const int64_t* shape, const EmuArg* call_args) {
  EmuCallArgs args;
  int index = 0;
#define EMU_UNPACK(schema_type, name, field_type) unpack(call_args[index++], args.name);
  FPA_CALL_ARGS(EMU_UNPACK)
#undef EMU_UNPACK
  AttentionParams p;
  p.batch = shape[0], p.heads_q = shape[1], p.heads_kv = shape[2], p.seq_q = shape[3], p.seq_k = shape[4];
  p.head_dim = shape[5];
  fill_call_args(p, args);
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

// The forward as the launcher runs it on a device of sm_count SMs (decode_plan, with min_split_keys for small test
// shapes), its workspace NaN-filled; plan_out gets the plan's (group, splits).
extern "C" void emu_forward(int dtype, const int64_t* shape, const EmuArg* call_args, void* q,
                            const int64_t* q_strides, void* k, const int64_t* k_strides, void* v,
                            const int64_t* v_strides, void* out, const int64_t* out_strides, float* lse,
                            int sm_count, int64_t min_split_keys, int* plan_out) {
  const AttentionParams p = make_params(shape, call_args);
  check_grid(p);
  const DecodePlan plan = decode_plan(p, sm_count, min_split_keys);
  std::vector<float> out_partial(split_rows(p, plan) * p.head_dim, NAN), lse_partial(split_rows(p, plan), NAN);
  const ForwardWorkspace ws{out_partial.empty() ? nullptr : out_partial.data(),
                            lse_partial.empty() ? nullptr : lse_partial.data()};
  const ForwardArgs args = forward_args(p, tensor4(q, q_strides), tensor4(k, k_strides), tensor4(v, v_strides),
                                        tensor4(out, out_strides), lse, plan, ws);
  plan_out[0] = plan.group;
  plan_out[1] = plan.splits;
  dispatch(dtype, p.head_dim, [&](auto* t, auto head_dim) {
    using T = std::remove_pointer_t<decltype(t)>;
    constexpr int kHeadDim = decltype(head_dim)::value;
    const dim3 grid = forward_grid(p, plan);  // the launcher's; an empty grid runs no block
    run_grid({grid.x, grid.y, grid.z}, [&] { attention_forward_kernel<T, kHeadDim>(p, args); });
    if (grid.x && grid.y && grid.z && plan.splits > 1) {
      run_grid({merge_grid(p).x, 1, 1}, [&] { attention_split_merge_kernel<T, kHeadDim>(p, args); });
    }
  });
}

extern "C" void emu_backward(int dtype, const int64_t* shape, const EmuArg* call_args, void* grad_out,
                             const int64_t* grad_out_strides, const float* grad_lse, void* q,
                             const int64_t* q_strides, void* k, const int64_t* k_strides, void* v,
                             const int64_t* v_strides, void* out, const int64_t* out_strides, const float* lse,
                             void* dq, const int64_t* dq_strides, void* dk, const int64_t* dk_strides, void* dv,
                             const int64_t* dv_strides, float* d_rel_bias, float* dq_accum, float* delta) {
  const AttentionParams p = make_params(shape, call_args);
  check_grid(p);
  const Tensor4 do4 = tensor4(grad_out, grad_out_strides), q4 = tensor4(q, q_strides), k4 = tensor4(k, k_strides);
  const Tensor4 v4 = tensor4(v, v_strides);
  const bool vec16 = allows_cp_async(do4) && allows_cp_async(q4) && allows_cp_async(k4) && allows_cp_async(v4);
  // As the launcher: d_rel_bias null (no table gradient) unless relative; per-block partial rows when they fit.
  float* d_table = p.pos == PosKind::kRelative ? d_rel_bias : nullptr;  // null: no table gradient
  std::vector<float> d_rel_partial(rel_partial_floats(p, d_table != nullptr), NAN);
  const BackwardArgs args{do4, q4, k4, v4, tensor4(dk, dk_strides), tensor4(dv, dv_strides), lse, delta, dq_accum,
                          d_table, d_rel_partial.empty() ? nullptr : d_rel_partial.data(), vec16};
  const Tensor4 out4 = tensor4(out, out_strides), dq4 = tensor4(dq, dq_strides);
  dispatch(dtype, p.head_dim, [&](auto* t, auto head_dim) {
    using T = std::remove_pointer_t<decltype(t)>;
    constexpr int kHeadDim = decltype(head_dim)::value;
    using Cfg = BackwardConfig<kHeadDim>;
    memset(dq_accum, 0, sizeof(float) * p.lse_rows() * kHeadDim);
    static_assert(Cfg::template Layout<T>::max_bytes <= sizeof(smem), "the emulated shared memory is too small");
    if (args.d_rel_bias && !args.d_rel_partial) {
      memset(args.d_rel_bias, 0, sizeof(float) * p.heads_q * p.rel_bias_stride_h());
    }
    run_grid({3, 1, 1},
             [&] { attention_backward_preprocess_kernel<T>(p, args.grad_out, out4, lse, grad_lse, delta); });
    const dim3 grid = backward_dkdv_grid(p);
    run_grid({grid.x, grid.y, grid.z}, [&] { attention_backward_dkdv_kernel<T, kHeadDim>(p, args); });
    run_grid({5, 1, 1}, [&] { attention_backward_dq_kernel<T>(p, dq_accum, dq4); });
    if (args.d_rel_partial) {
      run_grid({2, 1, 1}, [&] {
        attention_backward_rel_reduce_kernel(p, args.d_rel_partial, static_cast<int>(grid.x), args.d_rel_bias);
      });
    }
  });
}
