// See alloc_counter.hpp. Reuses the benchmarks' counter rather than a second copy of it.
#include "alloc_counter.hpp"

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
#define LORA_TEST_SANITIZED 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define LORA_TEST_SANITIZED 1
#endif

#if defined(LORA_TEST_SANITIZED)
bool lora::test::allocation_counter_available() {
  return false;
}
std::uint64_t lora::test::allocation_count() {
  return 0;
}
#else
#include "../benchmarks/alloc_counter.cpp"
bool lora::test::allocation_counter_available() {
  return true;
}
std::uint64_t lora::test::allocation_count() {
  return lora::bench::allocation_count();
}
#endif
