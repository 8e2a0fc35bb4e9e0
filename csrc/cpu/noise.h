// The CPU noise generator of the RNG contract, shared by the normal operator and the fused
// layers. Every element is computed by the same code path whatever the split of the range, so
// the output is bit-identical for any thread count or tiling.
#pragma once

#include <cstdint>

#include "cpu/simd.h"

namespace bnn_fast {
namespace cpu {

// out[k] = normal(seed, stream, start + k) for k in [0, n). Single-threaded; callers split.
// simd: simd_level() (cpu/simd.h), taken once by the caller rather than on every tile; every
// level gives the same bits.
void fill_normal(float* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t start,
                 SimdLevel simd);

// The same, split over the intra-op threads (at::parallel_for): bit-identical to fill_normal.
void fill_normal_parallel(float* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t start);

}  // namespace cpu
}  // namespace bnn_fast
