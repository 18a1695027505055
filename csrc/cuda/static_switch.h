// Runtime values -> compile-time constants (after FlashAttention's static_switch.h). The body, a lambda, is
// instantiated once per supported value; any other value throws std::invalid_argument naming it (the
// bindings turn it into a Python error). Only dtype and head dim are template parameters: position kind,
// causal and window are block-uniform runtime branches, which keeps the kernel count (and build time) small.
//
//   FPA_DTYPE_SWITCH(dtype, T, [&] {
//     FPA_HEADDIM_SWITCH(p.head_dim, kHeadDim, [&] { launch<T, kHeadDim>(...); });
//   });
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "cuda/launch.h"

#define FPA_DTYPE_SWITCH(DTYPE, T, ...)                                                                     \
  [&] {                                                                                                     \
    switch (DTYPE) {                                                                                        \
      case ::fused_pos_attn::gpu::DType::kFloat16: {                                                        \
        using T = __half;                                                                                   \
        return __VA_ARGS__();                                                                               \
      }                                                                                                     \
      case ::fused_pos_attn::gpu::DType::kBFloat16: {                                                       \
        using T = __nv_bfloat16;                                                                            \
        return __VA_ARGS__();                                                                               \
      }                                                                                                     \
      default:                                                                                              \
        throw std::invalid_argument("fused_pos_attn CUDA kernels: dtype code " +                           \
                                    std::to_string(static_cast<int>(DTYPE)) + " is not float16 or bfloat16"); \
    }                                                                                                       \
  }()

#define FPA_HEADDIM_SWITCH(HEADDIM, kHeadDim, ...)                                                          \
  [&] {                                                                                                     \
    switch (HEADDIM) {                                                                                      \
      case 64: {                                                                                            \
        constexpr static int kHeadDim = 64;                                                                 \
        return __VA_ARGS__();                                                                               \
      }                                                                                                     \
      case 128: {                                                                                           \
        constexpr static int kHeadDim = 128;                                                                \
        return __VA_ARGS__();                                                                               \
      }                                                                                                     \
      default:                                                                                              \
        throw std::invalid_argument("fused_pos_attn CUDA kernels: head dim " + std::to_string(HEADDIM) +   \
                                    " is not supported (64 or 128)");                                       \
    }                                                                                                       \
  }()
