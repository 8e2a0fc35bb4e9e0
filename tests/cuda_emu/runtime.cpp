// The one out-of-line piece of the emulated runtime: cudaGetLastError, which the toolkit's header
// declares with C linkage.
#include <cuda_runtime.h>

extern "C" cudaError_t cudaGetLastError(void) {
  const cudaError_t e = ::emu::rt.last_error;
  ::emu::rt.last_error = cudaSuccess;
  return e;
}
