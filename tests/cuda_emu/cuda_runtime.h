// The CUDA runtime header as the emulated kernels see it: the toolkit's own header (types,
// error codes, float4, dim3), then the device side that a host compiler lacks, from emu.h.
// Found before the toolkit's include directory, so `#include <cuda_runtime.h>` in csrc/cuda
// lands here when tests/cuda_emu/build.py compiles the kernels with g++.
#pragma once

#include_next <cuda_runtime.h>

#include "emu.h"
