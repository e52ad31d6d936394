// Qualifiers of the per-element arithmetic that the CPU and CUDA kernels share (the
// *_common.h headers): device functions under nvcc, plain inline functions elsewhere.
#pragma once

#if defined(__CUDACC__)
#define LF_HOST_DEVICE __host__ __device__ __forceinline__
#define LF_UNROLL _Pragma("unroll")
#else
#define LF_HOST_DEVICE inline
#define LF_UNROLL _Pragma("GCC unroll 16")
#endif
