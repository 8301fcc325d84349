// Qualifiers for code that one header gives to both the C++ and the CUDA compiler.
#pragma once

#if defined(__CUDACC__)
#define FASTAR_HOST_DEVICE __host__ __device__ __forceinline__
#define FASTAR_UNROLL _Pragma("unroll")
#else
#define FASTAR_HOST_DEVICE inline
#define FASTAR_UNROLL
#endif

// What a header gives to both compilers (g++ for csrc/cpu and csrc/fastar.cpp, nvcc for csrc/cuda)
// lives in an inline namespace named after the compiler: `fastar::foo` still names it in the
// source, but the object files of the two compilers no longer define the same mangled symbol.
// Without it, every inline function of a shared header (the argument checks, GatedStepShape's
// destructor, the categorical pick, which even differs between the two: the host-only block exp)
// was a weak symbol defined once by g++ and once by nvcc's host pass, and the linker kept one
// copy for both callers, an ODR merge of code built by different front ends and flags
// (cudafe++ rewrites the nvcc side; -fopenmp is g++ only). On the H200 the CUDA run of
// gated_pixelcnn_step's test_kernel_bad_input crashed (SIGSEGV) at the first bad input, where
// such a merged check throws, while the CPU run passed; whether the merge was the cause is
// unverified, but it can no longer be: each kernel now calls the copy its own compiler built.
#if defined(__CUDACC__)
#define FASTAR_TU_NAMESPACE tu_cuda
#else
#define FASTAR_TU_NAMESPACE tu_host
#endif
