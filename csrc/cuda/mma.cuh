// Tensor-core building blocks for sm_80+: mma.sync m16n8k16 (fp16 / bf16 in, fp32 accumulate), ldmatrix,
// cp.async, and fp16 / bf16 <-> fp32 conversions that do not rely on the half operators torch disables.
//
// Fragment layout of mma.sync.aligned.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), for lane
// l of a warp with g = l / 4 (group) and t = l % 4 (thread in group):
//   A (16 x 16, row-major), 4 registers of 2 elements:   a[0] = (g,     2t..2t+1)   a[1] = (g + 8, 2t..2t+1)
//                                                        a[2] = (g,   2t+8..2t+9)   a[3] = (g + 8, 2t+8..2t+9)
//   B (16 x 8, "col"), 2 registers:                       b[0] = (2t..2t+1, g)      b[1] = (2t+8..2t+9, g)
//   C / D (16 x 8, fp32), 4 floats:                       c[0..1] = (g, 2t..2t+1)   c[2..3] = (g + 8, 2t..2t+1)
// (row, column) pairs; the lower-indexed element sits in a register's low 16 bits. So every lane knows the
// (row, column) of each accumulator it holds, which is how position biases and masks are applied in registers,
// and two C tiles side by side (16 x 16) are exactly the A fragment of the next product (P V, dS K, ...).
//
// ldmatrix .x4 loads four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and register i
// of every lane receives matrix i: without .trans lane l gets (row g, columns 2t, 2t+1), with .trans
// (rows 2t, 2t+1, column g) of the stored matrix. The address helpers below turn that into A / B fragments.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

namespace fused_pos_attn::gpu {

constexpr int kWarpSize = 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Two floats rounded to T and packed in one register, lo in the low half (an mma operand, or two adjacent
// elements of a row for a 4-byte store).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &h, sizeof(r));
  return r;
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &h, sizeof(r));
  return r;
}

// d += A * B for one m16n8k16 tile (layouts above).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The A fragment of a 16 x 16 block whose C tiles are c_left (columns 0-7) and c_right (columns 8-15).
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c_left)[4], const float (&c_right)[4]) {
  a[0] = pack2<T>(c_left[0], c_left[1]);
  a[1] = pack2<T>(c_left[2], c_left[3]);
  a[2] = pack2<T>(c_right[0], c_right[1]);
  a[3] = pack2<T>(c_right[2], c_right[3]);
}

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_row)));
}

// Fragment loads from a row-major shared tile with row stride `stride` (elements, a multiple of 8 so every
// row address is 16-byte aligned). (r0, c0) is the top-left element of the 16 x 16 block.

// A fragment of the block stored as it is multiplied (rows = m, columns = k).
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int stride, int r0, int c0, int lane) {
  ldmatrix_x4(a, tile + (r0 + lane % 16) * stride + c0 + (lane / 16) * 8);
}

// A fragment of the transpose of the stored block (stored rows = k, stored columns = m).
template <typename T>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const T* tile, int stride, int r0, int c0, int lane) {
  ldmatrix_x4_trans(a, tile + (r0 + lane % 8 + (lane / 16) * 8) * stride + c0 + ((lane / 8) % 2) * 8);
}

// B fragments of two n8 tiles from a block stored n-major (stored rows = n, stored columns = k), as K in
// Q K^T: {b[0], b[1]} is stored rows r0..r0+7, {b[2], b[3]} rows r0+8..r0+15.
template <typename T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const T* tile, int stride, int r0, int c0, int lane) {
  ldmatrix_x4(b, tile + (r0 + lane % 8 + (lane / 16) * 8) * stride + c0 + ((lane / 8) % 2) * 8);
}

// B fragments of two n8 tiles from a block stored k-major (stored rows = k, stored columns = n), as V in
// P V: {b[0], b[1]} is stored columns c0..c0+7, {b[2], b[3]} columns c0+8..c0+15.
template <typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const T* tile, int stride, int r0, int c0, int lane) {
  ldmatrix_x4_trans(b, tile + (r0 + lane % 8 + ((lane / 8) % 2) * 8) * stride + c0 + (lane / 16) * 8);
}

// 16-byte global -> shared copy that bypasses registers; src_valid = false writes 16 zero bytes (src unread).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool src_valid) {
  const int src_bytes = src_valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Wait until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Sum / max over the 4 lanes of a group (the lanes sharing the rows g and g + 8 of a C fragment).
__device__ __forceinline__ float group_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float group_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

}  // namespace fused_pos_attn::gpu
