// Launcher of the CUDA attention backward (kernels: backward_kernel.cuh): 9 instantiations, the dK / dV
// kernel per fp16 / bf16 x D 64 / 128, preprocess and dq per dtype, and the relative table's reduction.
#include "cuda/backward_kernel.cuh"
#include "cuda/launch.h"
#include "cuda/static_switch.h"

namespace fused_pos_attn::gpu {
namespace {

// Blocks for a grid-stride loop over `work` items of kThreads each (at most a few waves' worth).
unsigned grid_stride_blocks(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

template <typename T, int kHeadDim>
cudaError_t launch_backward(const AttentionParams& p, const BackwardArgs& args, const float* grad_lse,
                            const Tensor4& out, const Tensor4& dq, const BackwardWorkspace& ws, cudaStream_t stream) {
  using Cfg = BackwardConfig<kHeadDim>;
  using Layout = typename Cfg::template Layout<T>;
  const int64_t rows = p.lse_rows();
  const bool table_grad = args.d_rel_bias != nullptr, table_atomics = table_grad && args.d_rel_partial == nullptr;
  cudaError_t err = cudaMemsetAsync(args.dq_accum, 0, sizeof(float) * rows * kHeadDim, stream);
  if (err == cudaSuccess && table_atomics) {
    err = cudaMemsetAsync(args.d_rel_bias, 0, sizeof(float) * p.heads_q * p.rel_bias_stride_h(), stream);
  }
  if (err != cudaSuccess) return err;

  attention_backward_preprocess_kernel<T><<<grid_stride_blocks(rows * kWarpSize), kThreads, 0, stream>>>(
      p, args.grad_out, out, args.lse, grad_lse, ws.delta);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  const int smem = Layout::launch_bytes(table_grad, args.d_rel_partial ? p.rel_bias_stride_h() : 0);
  auto* dkdv = attention_backward_dkdv_kernel<T, kHeadDim>;
  if (smem > 48 * 1024 && (err = cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                      Layout::max_bytes)) != cudaSuccess) {
    return err;
  }
  const dim3 grid = backward_dkdv_grid(p);
  const int key_blocks = static_cast<int>(grid.x);
  if (grid.x > 0 && grid.y > 0 && grid.z > 0) {  // else no keys (or no sequence): dq and the table gradient are 0
    dkdv<<<grid, kThreads, smem, stream>>>(p, args);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }

  attention_backward_dq_kernel<T><<<grid_stride_blocks(rows * kHeadDim), kThreads, 0, stream>>>(p, args.dq_accum, dq);
  if ((err = cudaGetLastError()) != cudaSuccess || args.d_rel_partial == nullptr) return err;

  attention_backward_rel_reduce_kernel<<<grid_stride_blocks(p.heads_q * p.rel_bias_stride_h()), kThreads, 0,
                                         stream>>>(p, args.d_rel_partial, key_blocks, args.d_rel_bias);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_backward(const AttentionParams& p, DType dtype, const Tensor4& grad_out, const float* grad_lse,
                               const Tensor4& q, const Tensor4& k, const Tensor4& v, const Tensor4& out,
                               const float* lse, const Tensor4& dq, const Tensor4& dk, const Tensor4& dv,
                               float* d_rel_bias, const BackwardWorkspace& ws, cudaStream_t stream) {
  check_grid(p);
  const bool vec16 = allows_cp_async(grad_out) && allows_cp_async(q) && allows_cp_async(k) && allows_cp_async(v);
  float* d_table = p.pos == PosKind::kRelative ? d_rel_bias : nullptr;  // null: no table gradient
  const BackwardArgs args{grad_out, q, k, v, dk, dv, lse, ws.delta, ws.dq_accum, d_table,
                          rel_partial_floats(p, d_table != nullptr) > 0 ? ws.d_rel_partial : nullptr, vec16};
  return FPA_DTYPE_SWITCH(dtype, T, [&] {
    return FPA_HEADDIM_SWITCH(p.head_dim, kHeadDim,
                              [&] { return launch_backward<T, kHeadDim>(p, args, grad_lse, out, dq, ws, stream); });
  });
}

}  // namespace fused_pos_attn::gpu
