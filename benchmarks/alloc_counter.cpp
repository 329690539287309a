// Replaces the global operator new and, on glibc, wraps the malloc family, counting each call.
// Eigen allocates with std::malloc, not operator new, so counting new alone would miss its
// temporaries; glibc exports __libc_malloc and friends, which the wrappers forward to.
#include "alloc_counter.hpp"

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>

namespace {
std::atomic<std::uint64_t> g_allocations{0};
inline void count() {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
}
}  // namespace

std::uint64_t lora::bench::allocation_count() {
  return g_allocations.load(std::memory_order_relaxed);
}

#if defined(__GLIBC__)
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);

void* malloc(std::size_t size) {
  count();
  return __libc_malloc(size);
}
void* calloc(std::size_t n, std::size_t size) {
  count();
  return __libc_calloc(n, size);
}
void* realloc(void* p, std::size_t size) {
  count();
  return __libc_realloc(p, size);
}
void free(void* p) {
  __libc_free(p);
}
int posix_memalign(void** out, std::size_t alignment, std::size_t size) {
  count();
  void* p = __libc_memalign(alignment, size);
  if (p == nullptr && size != 0) return 12;  // ENOMEM
  *out = p;
  return 0;
}
void* aligned_alloc(std::size_t alignment, std::size_t size) {
  count();
  return __libc_memalign(alignment, size);
}
void* memalign(std::size_t alignment, std::size_t size) {
  count();
  return __libc_memalign(alignment, size);
}
}
#endif

// operator new: counted here and allocated with the (wrapped, so not counted twice) libc call.
namespace {
void* counted_new(std::size_t size) {
#if defined(__GLIBC__)
  count();
  void* p = __libc_malloc(size == 0 ? 1 : size);
#else
  count();
  void* p = std::malloc(size == 0 ? 1 : size);
#endif
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
void* counted_new_aligned(std::size_t size, std::size_t alignment) {
  count();
#if defined(__GLIBC__)
  void* p = __libc_memalign(alignment, size == 0 ? 1 : size);
#else
  void* p = std::aligned_alloc(alignment, (size + alignment - 1) / alignment * alignment);
#endif
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
void release(void* p) noexcept {
#if defined(__GLIBC__)
  __libc_free(p);
#else
  std::free(p);
#endif
}
}  // namespace

void* operator new(std::size_t size) {
  return counted_new(size);
}
void* operator new[](std::size_t size) {
  return counted_new(size);
}
void* operator new(std::size_t size, std::align_val_t a) {
  return counted_new_aligned(size, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t size, std::align_val_t a) {
  return counted_new_aligned(size, static_cast<std::size_t>(a));
}
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  try {
    return counted_new(size);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
  try {
    return counted_new(size);
  } catch (...) {
    return nullptr;
  }
}
void operator delete(void* p) noexcept {
  release(p);
}
void operator delete[](void* p) noexcept {
  release(p);
}
void operator delete(void* p, std::size_t) noexcept {
  release(p);
}
void operator delete[](void* p, std::size_t) noexcept {
  release(p);
}
void operator delete(void* p, std::align_val_t) noexcept {
  release(p);
}
void operator delete[](void* p, std::align_val_t) noexcept {
  release(p);
}
void operator delete(void* p, std::size_t, std::align_val_t) noexcept {
  release(p);
}
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept {
  release(p);
}
