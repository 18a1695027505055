// Host emulation of the CUDA execution model the fused_pos_attn kernels use (tests/test_cuda_emulated.py):
// one std::thread per CUDA thread, std::barrier for __syncthreads and for warp collectives (shuffles,
// ldmatrix, mma.sync), whose results follow the PTX ISA's definitions (fragment layouts in csrc/cuda/mma.cuh).
// Force-included (-include) before the kernel headers; mma.cuh's inline-PTX bodies call emu::ldmatrix /
// emu::mma instead (the test swaps them), everything else is the kernels' own source.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <mutex>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __align__
#undef __launch_bounds__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __grid_constant__

namespace emu {
struct Dim { unsigned x = 0, y = 0, z = 0; };
struct Warp {
  std::barrier<> bar{32};
  const void* ptr[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  float f[32];
};
inline thread_local Dim thread_idx, block_idx;
inline Dim grid_dim;
inline thread_local Warp* warp;
inline thread_local int lane;
inline thread_local std::barrier<>* block_bar;
inline std::mutex atomic_mutex;
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define gridDim emu::grid_dim

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float x, int offset) {
  auto& w = *emu::warp;
  w.f[emu::lane] = x;
  w.bar.arrive_and_wait();
  const float r = w.f[emu::lane ^ offset];
  w.bar.arrive_and_wait();
  return r;
}
inline float atomicAdd(float* p, float v) {
  std::lock_guard<std::mutex> lock(emu::atomic_mutex);
  const float old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }

namespace emu {
inline void ldmatrix(uint32_t (&r)[4], const void* p, bool trans) {
  auto& w = *warp;
  w.ptr[lane] = p;
  w.bar.arrive_and_wait();
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    if (!trans) {
      memcpy(&r[i], static_cast<const char*>(w.ptr[8 * i + g]) + 4 * t, 4);
    } else {
      uint16_t lo, hi;
      memcpy(&lo, static_cast<const char*>(w.ptr[8 * i + 2 * t]) + 2 * g, 2);
      memcpy(&hi, static_cast<const char*>(w.ptr[8 * i + 2 * t + 1]) + 2 * g, 2);
      r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
  w.bar.arrive_and_wait();
}
inline float half_bits(uint16_t bits, __half*) { __half_raw r; r.x = bits; return __half2float(__half(r)); }
inline float half_bits(uint16_t bits, __nv_bfloat16*) {
  __nv_bfloat16_raw r; r.x = bits; return __bfloat162float(__nv_bfloat16(r));
}
template <typename T>
inline float elem(uint32_t reg, int half) { return half_bits(uint16_t(half ? reg >> 16 : reg & 0xffff), (T*)nullptr); }
template <typename T>
inline void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  auto& w = *warp;
  for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i];
  w.b[lane][0] = b0;
  w.b[lane][1] = b1;
  w.bar.arrive_and_wait();
  const int g = lane / 4, t = lane % 4;
  for (int c = 0; c < 4; ++c) {
    const int row = g + 8 * (c / 2), col = 2 * t + c % 2;
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) {
      const float av = elem<T>(w.a[(row % 8) * 4 + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)], k % 2);
      const float bv = elem<T>(w.b[col * 4 + (k % 8) / 2][k >= 8], k % 2);
      sum += av * bv;
    }
    d[c] += sum;
  }
  w.bar.arrive_and_wait();
}
}  // namespace emu
