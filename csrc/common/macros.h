// Qualifiers for code that one header gives to both the C++ and the CUDA compiler.
#pragma once

#if defined(__CUDACC__)
#define FASTAR_HOST_DEVICE __host__ __device__ __forceinline__
#define FASTAR_UNROLL _Pragma("unroll")
#else
#define FASTAR_HOST_DEVICE inline
#define FASTAR_UNROLL
#endif
