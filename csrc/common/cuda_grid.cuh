// Grid-wide synchronisation for persistent (cooperatively launched) CUDA kernels: the LSTM scans
// (csrc/cuda/lstm_scan.cu) and the persistent WaveNet step (csrc/cuda/wavenet.cu).
#pragma once
#include <cuda_runtime.h>

namespace fastar {

// A grid barrier on one 64-bit counter in global memory, zeroed before the launch.
// All CTAs must be co-resident (cooperative launch, grid <= occupancy x SMs), so spinning cannot
// deadlock. The counter only grows (64 bits: no wrap); barrier n completes when it reaches
// n * gridDim.x, so the caller passes ++n * gridDim.x. __syncthreads orders the CTA's writes
// before thread 0's fence and arrival (fences are cumulative in the PTX memory model); the fence
// after the spin orders the CTA's later reads after every other CTA's arrival: the pattern of
// cooperative_groups' grid sync, without its launch requirements.
__device__ __forceinline__ void grid_barrier(unsigned long long* ctr, unsigned long long target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(ctr, 1ull);
    while (*reinterpret_cast<volatile unsigned long long*>(ctr) < target) {
    }
    __threadfence();
  }
  __syncthreads();
}

}  // namespace fastar
