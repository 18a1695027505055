// Launcher of the CUDA attention forward (kernels: forward_kernel.cuh): 4 instantiations, fp16 / bf16 x D 64 / 128,
// of the forward and of the split merge.
#include "cuda/forward_kernel.cuh"
#include "cuda/launch.h"
#include "cuda/static_switch.h"

namespace fused_pos_attn::gpu {
namespace {

template <typename T, int kHeadDim>
cudaError_t launch_forward(const AttentionParams& p, const ForwardArgs& args, cudaStream_t stream) {
  using Cfg = ForwardConfig<kHeadDim>;
  constexpr int smem = Cfg::template smem_bytes<T>();
  static_assert(smem <= 48 * 1024, "forward tiles must fit the default shared-memory limit");
  const dim3 grid = forward_grid(p, args.plan);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;  // no rows (or no sequence)
  attention_forward_kernel<T, kHeadDim><<<grid, kThreads, smem, stream>>>(p, args);
  if (args.plan.splits > 1) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    attention_split_merge_kernel<T, kHeadDim><<<merge_grid(p), kThreads, 0, stream>>>(p, args);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_forward(const AttentionParams& p, DType dtype, const Tensor4& q, const Tensor4& k,
                              const Tensor4& v, const Tensor4& out, float* lse, const DecodePlan& plan,
                              const ForwardWorkspace& ws, cudaStream_t stream) {
  check_grid(p);
  const ForwardArgs args = forward_args(p, q, k, v, out, lse, plan, ws);
  return FPA_DTYPE_SWITCH(dtype, T, [&] {
    return FPA_HEADDIM_SWITCH(p.head_dim, kHeadDim, [&] { return launch_forward<T, kHeadDim>(p, args, stream); });
  });
}

}  // namespace fused_pos_attn::gpu
