// oneDNN's matmul primitive for lora's column-major products, created once per shape and cached.
// An optional dependency: include this header (or a storage built on it) only when linking
// lora::onednn, which CMake defines when it finds oneDNN (Debian: libdnnl-dev).
//
// Every product lora needs is C (+)= op(W) * B with column-major Eigen storage. oneDNN's matmul is
// row-major dst(M x N) = src(M x K) * wei(K x N); a column-major matrix is the row-major view of
// its transpose, so C = W * X becomes C^T = X^T * W^T with M = n (the batch), and every operand is
// described by strides over the caller's memory: nothing is copied to change layout.
#pragma once

#if !defined(LORA_WITH_ONEDNN)
#error \
    "lora/onednn/*.hpp needs oneDNN: link the lora::onednn CMake target (found when libdnnl-dev is installed), which defines LORA_WITH_ONEDNN"
#endif

#include <oneapi/dnnl/dnnl.hpp>

#include <Eigen/Core>

#include <cstddef>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace lora::onednn {

using Index = Eigen::Index;
using dt = dnnl::memory::data_type;

/// The CPU engine all lora storages share.
inline const dnnl::engine& engine() {
  static const dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

/// A stream per calling thread (streams are not meant to be shared between threads).
inline dnnl::stream& stream() {
  thread_local dnnl::stream s(engine());
  return s;
}

/// "oneDNN 2.6.3, ISA avx512_core_bf16": what oneDNN will run on this CPU (AMX, AVX-512 bf16, ...).
inline std::string runtime_report() {
  const dnnl_version_t* v = dnnl_version();
  const char* isa = "unknown";
  switch (dnnl_get_effective_cpu_isa()) {
    case dnnl_cpu_isa_sse41:
      isa = "sse41";
      break;
    case dnnl_cpu_isa_avx:
      isa = "avx";
      break;
    case dnnl_cpu_isa_avx2:
      isa = "avx2";
      break;
    case dnnl_cpu_isa_avx512_mic:
      isa = "avx512_mic";
      break;
    case dnnl_cpu_isa_avx512_mic_4ops:
      isa = "avx512_mic_4ops";
      break;
    case dnnl_cpu_isa_avx512_core:
      isa = "avx512_core (no bf16 instructions: bf16 is emulated)";
      break;
    case dnnl_cpu_isa_avx512_core_vnni:
      isa = "avx512_core_vnni (no bf16 instructions: bf16 is emulated)";
      break;
    case dnnl_cpu_isa_avx512_core_bf16:
      isa = "avx512_core_bf16 (vdpbf16ps)";
      break;
    case dnnl_cpu_isa_avx512_core_amx:
      isa = "avx512_core_amx (AMX tiles)";
      break;
    case dnnl_cpu_isa_avx2_vnni:
      isa = "avx2_vnni";
      break;
    default:
      break;
  }
  std::ostringstream s;
  s << "oneDNN " << v->major << "." << v->minor << "." << v->patch << ", ISA " << isa;
  return s.str();
}

/// True when oneDNN can create a bf16 matmul on this CPU (with bf16 or AMX instructions, or by
/// emulating them on plain AVX-512); checked once.
inline bool bf16_matmul_supported() {
  static const bool supported = [] {
    try {
      using dims = dnnl::memory::dims;
      const dnnl::memory::desc a(dims{2, 32}, dt::bf16, dims{32, 1});
      const dnnl::memory::desc b(dims{32, 16}, dt::bf16, dims{16, 1});
      const dnnl::memory::desc c(dims{2, 16}, dt::f32, dims{16, 1});
      dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), engine());
      return true;
    } catch (const dnnl::error&) {
      return false;
    }
  }();
  return supported;
}

/// One product's shape and layout: dst (M x N, row stride dst_ld) (+)= src (M x K, row stride
/// src_ld) * wei (K x N, strides wei_s0 along K and wei_s1 along N).
struct MatmulShape {
  Index M = 0;              ///< rows of src and dst
  Index K = 0;              ///< the depth: columns of src, rows of wei
  Index N = 0;              ///< columns of wei and dst
  Index src_ld = 0;         ///< row stride of src
  Index dst_ld = 0;         ///< row stride of dst
  Index wei_s0 = 0;         ///< stride of wei along K
  Index wei_s1 = 0;         ///< stride of wei along N
  dt src_type = dt::f32;    ///< element type of src (dst is always f32)
  dt wei_type = dt::f32;    ///< element type of wei
  bool accumulate = false;  ///< dst += product (oneDNN's sum post-op) instead of dst = product

  /// Same shape, layout and types: the same primitive serves both.
  bool operator==(const MatmulShape& o) const {
    return M == o.M && K == o.K && N == o.N && src_ld == o.src_ld && dst_ld == o.dst_ld &&
           wei_s0 == o.wei_s0 && wei_s1 == o.wei_s1 && src_type == o.src_type &&
           wei_type == o.wei_type && accumulate == o.accumulate;
  }
};

/// Matmul primitives created once per shape and reused: a call with a shape seen before creates
/// nothing and allocates no buffer (the scratchpad is owned here, not by the library). Calls are
/// serialised by a mutex, since a primitive's scratchpad is used by one execution at a time.
class MatmulCache {
 public:
  /// Runs the product for `shape` on the given buffers (dst float, the others of the shape's
  /// types), creating and caching its primitive on first use.
  void run(const MatmulShape& shape, const void* src, const void* wei, float* dst) {
    std::lock_guard<std::mutex> lock(mutex_);
    Entry& e = find_or_create(shape);
    dnnl_memory_set_data_handle(e.src.get(), const_cast<void*>(src));
    dnnl_memory_set_data_handle(e.wei.get(), const_cast<void*>(wei));
    dnnl_memory_set_data_handle(e.dst.get(), dst);
    // The C call takes a plain array: the C++ overload builds a std::unordered_map per call.
    const dnnl_exec_arg_t args[] = {{DNNL_ARG_SRC, e.src.get()},
                                    {DNNL_ARG_WEIGHTS, e.wei.get()},
                                    {DNNL_ARG_DST, e.dst.get()},
                                    {DNNL_ARG_SCRATCHPAD, e.scratchpad.get()}};
    dnnl::error::wrap_c_api(dnnl_primitive_execute(e.primitive.get(), stream().get(), 4, args),
                            "lora::onednn: matmul execution failed");
    dnnl::error::wrap_c_api(dnnl_stream_wait(stream().get()), "lora::onednn: stream wait failed");
  }

  /// oneDNN's implementation name for a cached shape ("brg:avx512_core_bf16", ...), or "".
  std::string implementation(const MatmulShape& shape) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const Entry& e : entries_)
      if (e.shape == shape) return e.impl;
    return {};
  }

 private:
  struct Entry {
    MatmulShape shape;
    dnnl::matmul primitive;
    dnnl::memory src, wei, dst, scratchpad;
    std::string impl;
  };

  // Shapes differ by batch size; a bound keeps a layer fed many batch sizes from growing forever.
  static constexpr std::size_t kMaxEntries = 16;

  Entry& find_or_create(const MatmulShape& s) {
    for (Entry& e : entries_)
      if (e.shape == s) return e;
    using dims = dnnl::memory::dims;
    const dnnl::memory::desc src_md(dims{s.M, s.K}, s.src_type, dims{s.src_ld, 1});
    const dnnl::memory::desc wei_md(dims{s.K, s.N}, s.wei_type, dims{s.wei_s0, s.wei_s1});
    const dnnl::memory::desc dst_md(dims{s.M, s.N}, dt::f32, dims{s.dst_ld, 1});
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    if (s.accumulate) {
      dnnl::post_ops ops;
      ops.append_sum(1.0f);
      attr.set_post_ops(ops);
    }
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_md, wei_md, dst_md), attr,
                                          engine());
    if (entries_.size() >= kMaxEntries) entries_.erase(entries_.begin());
    Entry e;
    e.shape = s;
    e.primitive = dnnl::matmul(pd);
    e.src = dnnl::memory(src_md, engine(), DNNL_MEMORY_NONE);
    e.wei = dnnl::memory(wei_md, engine(), DNNL_MEMORY_NONE);
    e.dst = dnnl::memory(dst_md, engine(), DNNL_MEMORY_NONE);
    e.scratchpad = dnnl::memory(pd.scratchpad_desc(), engine());
    e.impl = pd.impl_info_str();
    entries_.push_back(std::move(e));
    return entries_.back();
  }

  std::mutex mutex_;
  std::vector<Entry> entries_;
};

/// Describes C (+)= W * B for column-major C (rows x n, ld c_ld), W (rows x depth, packed) and
/// B (depth x n, ld b_ld): oneDNN's C^T = B^T * W^T.
inline MatmulShape product_shape(Index rows, Index depth, Index n, Index b_ld, Index c_ld, dt type,
                                 bool accumulate) {
  MatmulShape s;
  s.M = n;
  s.K = depth;
  s.N = rows;
  s.src_ld = b_ld;
  s.dst_ld = c_ld;
  s.wei_s0 = rows;  // W^T(kk, i) = W(i, kk) at i + kk * rows
  s.wei_s1 = 1;
  s.src_type = s.wei_type = type;
  s.accumulate = accumulate;
  return s;
}

/// Describes C (+)= W^T * B for column-major W (depth x cols, packed), B (depth x n, ld b_ld),
/// C (cols x n, ld c_ld): oneDNN's C^T = B^T * W, with W read through its strides.
inline MatmulShape transposed_product_shape(Index depth, Index cols, Index n, Index b_ld,
                                            Index c_ld, dt type, bool accumulate) {
  MatmulShape s;
  s.M = n;
  s.K = depth;
  s.N = cols;
  s.src_ld = b_ld;
  s.dst_ld = c_ld;
  s.wei_s0 = 1;  // W(i, j) at i + j * depth
  s.wei_s1 = depth;
  s.src_type = s.wei_type = type;
  s.accumulate = accumulate;
  return s;
}

}  // namespace lora::onednn
