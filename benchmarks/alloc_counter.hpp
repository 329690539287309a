// Counts every heap allocation of the process (operator new and the malloc family, which Eigen
// uses), so that a benchmark can report allocations per iteration.
#pragma once

#include <cstdint>

namespace lora::bench {

/// Heap allocations made so far by any thread (operator new, malloc, calloc, realloc,
/// posix_memalign, aligned_alloc).
std::uint64_t allocation_count();

}  // namespace lora::bench
