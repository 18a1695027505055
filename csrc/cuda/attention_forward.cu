// Launcher of the CUDA attention forward (kernel: forward_kernel.cuh): 4 instantiations, fp16 / bf16 x D 64 / 128.
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
  const dim3 grid = forward_grid<kHeadDim>(p);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;  // no rows (or no sequence)
  attention_forward_kernel<T, kHeadDim><<<grid, kThreads, smem, stream>>>(p, args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_forward(const AttentionParams& p, DType dtype, const Tensor4& q, const Tensor4& k,
                              const Tensor4& v, const Tensor4& out, float* lse, cudaStream_t stream) {
  check_grid(p);
  const ForwardArgs args{q, k, v, out, lse, allows_cp_async(q) && allows_cp_async(k) && allows_cp_async(v)};
  return FPA_DTYPE_SWITCH(dtype, T, [&] {
    return FPA_HEADDIM_SWITCH(p.head_dim, kHeadDim, [&] { return launch_forward<T, kHeadDim>(p, args, stream); });
  });
}

}  // namespace fused_pos_attn::gpu
