// Heap-allocation counting for the zero-allocation tests (the benchmarks' counter, see
// benchmarks/alloc_counter.cpp). Sanitizer builds own malloc and operator new: there the counter
// is unavailable and those tests skip.
#pragma once

#include <cstdint>

namespace lora::test {

/// True when allocation_count() counts (not in sanitizer builds).
bool allocation_counter_available();
/// Heap allocations made so far by any thread.
std::uint64_t allocation_count();

}  // namespace lora::test
