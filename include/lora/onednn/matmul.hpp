// oneDNN's matmul primitive for lora's column-major products, created once per shape and cached.
// An optional dependency: include this header (or a storage built on it) only when linking
// lora::onednn, which CMake defines when it finds oneDNN (Debian: libdnnl-dev).
//
// Every product lora needs is C (+)= op(W) * B with column-major Eigen storage. oneDNN's matmul is
// row-major dst(M x N) = src(M x K) * wei(K x N); a column-major matrix is the row-major view of
// its transpose, so C = W * X becomes C^T = X^T * W^T with M = n (the batch), and every operand is
// described by strides over the caller's memory: nothing is copied to change layout.
//
// Or, for the weight, a product can ask for a prepacked weight (MatmulShape::packed_weights):
// oneDNN chooses the weight's layout for the CPU it runs on (format_tag::any), and the cache keeps
// W reordered into that layout, once per version of the weight (the caller bumps the version when
// W changes, e.g. at merge and unmerge), beside the caller's copy. It costs one copy of W per
// orientation used (W X and W^T G read W in different layouts), and pays off where oneDNN's
// kernel for the strided view is slow (on a Zen 4, small batches: see docs/bf16_amx.md).
#pragma once

#if !defined(LORA_WITH_ONEDNN)
#error \
    "lora/onednn/*.hpp needs oneDNN: link the lora::onednn CMake target (found when libdnnl-dev is installed), which defines LORA_WITH_ONEDNN"
#endif

#include <oneapi/dnnl/dnnl.hpp>

#include <Eigen/Core>

#include <cstddef>
#include <cstdint>
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

/// How a oneDNN storage hands its weight to oneDNN.
enum class WeightLayout {
  /// Read through strides from the storage's own column-major weight: no copy.
  Strided,
  /// A copy in the layout oneDNN prefers on this CPU (format_tag::any), made at the first product
  /// and after each change of the weight: one copy per orientation used (W X; W^T G).
  Prepacked,
};

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
  /// Run on a copy of the weight in oneDNN's preferred layout (see the top of this file) instead
  /// of reading it through wei_s0/wei_s1.
  bool packed_weights = false;

  /// Same shape, layout and types: the same primitive serves both.
  bool operator==(const MatmulShape& o) const {
    return M == o.M && K == o.K && N == o.N && src_ld == o.src_ld && dst_ld == o.dst_ld &&
           wei_s0 == o.wei_s0 && wei_s1 == o.wei_s1 && src_type == o.src_type &&
           wei_type == o.wei_type && accumulate == o.accumulate &&
           packed_weights == o.packed_weights;
  }

  /// "dst(512 x 4096) += src(512 x 4096) * wei(4096 x 4096, prepacked)": the product, for reports.
  std::string describe() const {
    std::ostringstream out;
    out << "dst(" << M << " x " << N << ")" << (accumulate ? " +=" : " =") << " src(" << M << " x "
        << K << ") * wei(" << K << " x " << N << ", "
        << (packed_weights ? "prepacked" : (wei_s0 == 1 ? "column-major view" : "row-major view"))
        << ")";
    return out.str();
  }
};

namespace impl_detail {
/// The oneDNN implementations that lora's products have run on, for the reports.
struct ImplementationRegistry {
  std::mutex mutex;                ///< guards names
  std::vector<std::string> names;  ///< one per distinct implementation string
};
inline ImplementationRegistry& implementation_registry() {
  static ImplementationRegistry r;
  return r;
}
inline void note_implementation(const std::string& name) {
  ImplementationRegistry& r = implementation_registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  for (const std::string& n : r.names)
    if (n == name) return;
  r.names.push_back(name);
}
}  // namespace impl_detail

/// Every distinct oneDNN implementation that a lora product has created in this process
/// ("brg:avx512_core_bf16", "brg:avx512_core_amx_bf16", ...), in order of first use. Recorded
/// when a primitive is created (once per shape), never on a product's hot path.
inline std::vector<std::string> implementations_seen() {
  impl_detail::ImplementationRegistry& r = impl_detail::implementation_registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  return r.names;
}

/// Matmul primitives created once per shape and reused: a call with a shape seen before creates
/// nothing and allocates no buffer (the scratchpad is owned here, not by the library). Calls are
/// serialised by a mutex, since a primitive's scratchpad is used by one execution at a time.
/// Prepacked weights (MatmulShape::packed_weights) live here too, one per layout and orientation.
class MatmulCache {
 public:
  /// Runs the product for `shape` on the given buffers (dst float, the others of the shape's
  /// types), creating and caching its primitive on first use. For a prepacked shape, `wei` is
  /// the caller's weight as the shape's strides describe it, and `weight_version` names its
  /// contents: the packed copy is (re)made when the pointer or the version differs from the last
  /// packing, and otherwise reused.
  void run(const MatmulShape& shape, const void* src, const void* wei, float* dst,
           std::uint64_t weight_version = 0) {
    std::lock_guard<std::mutex> lock(mutex_);
    Entry& e = find_or_create(shape);
    dnnl_memory_t weights = e.wei.get();
    if (shape.packed_weights) {
      weights = packed(e, wei, weight_version).get();
    } else {
      dnnl_memory_set_data_handle(e.wei.get(), const_cast<void*>(wei));
    }
    dnnl_memory_set_data_handle(e.src.get(), const_cast<void*>(src));
    dnnl_memory_set_data_handle(e.dst.get(), dst);
    // The C call takes a plain array: the C++ overload builds a std::unordered_map per call.
    const dnnl_exec_arg_t args[] = {{DNNL_ARG_SRC, e.src.get()},
                                    {DNNL_ARG_WEIGHTS, weights},
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

  /// One line per cached product: its shape and layout, then oneDNN's implementation, e.g.
  /// "dst(1 x 4096) += src(1 x 4096) * wei(4096 x 4096, prepacked): brg:avx512_core_bf16".
  std::vector<std::string> report() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::string> out;
    for (const Entry& e : entries_) out.push_back(e.shape.describe() + ": " + e.impl);
    return out;
  }

  /// Bytes held in prepacked copies of weights.
  std::size_t packed_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::size_t bytes = 0;
    for (const Pack& p : packs_) bytes += p.desc.get_size();
    return bytes;
  }

 private:
  struct Entry {
    MatmulShape shape;
    dnnl::matmul primitive;
    dnnl::memory src, wei, dst, scratchpad;
    dnnl::memory::desc wei_plain;  // the caller's weight, as the strides describe it
    std::string impl;
  };
  // A weight reordered into a primitive's layout; shared by every shape that asks for the same
  // layout of the same view of the same buffer (oneDNN picks one layout per K x N whatever the
  // batch M). Keyed by the caller's buffer too, so that a storage switching between two buffers
  // (W0 and a merged copy) keeps both packed instead of reordering at each switch.
  struct Pack {
    dnnl::memory::desc desc, plain;
    dnnl::memory memory;
    const void* source = nullptr;
    std::uint64_t version = 0;
  };

  // Shapes differ by batch size; a bound keeps a layer fed many batch sizes from growing forever.
  static constexpr std::size_t kMaxEntries = 16;
  // Packed copies: one per orientation and buffer in practice (W0 for W X and W^T G, a merged
  // copy for W X); the bound is a safety net.
  static constexpr std::size_t kMaxPacks = 4;

  const dnnl::memory& packed(Entry& e, const void* wei, std::uint64_t version) {
    const dnnl::memory::desc want = e.wei.get_desc();
    Pack* pack = nullptr;
    for (Pack& p : packs_)
      if (p.desc == want && p.plain == e.wei_plain && p.source == wei) pack = &p;
    const bool fresh = pack == nullptr;
    if (fresh) {
      if (packs_.size() >= kMaxPacks) packs_.erase(packs_.begin());
      Pack p;
      p.desc = want;
      p.plain = e.wei_plain;
      p.source = wei;
      p.memory = dnnl::memory(want, engine());
      packs_.push_back(std::move(p));
      pack = &packs_.back();
    }
    if (fresh || pack->version != version) {
      dnnl::memory from(e.wei_plain, engine(), const_cast<void*>(wei));
      dnnl::reorder(from, pack->memory).execute(stream(), from, pack->memory);
      stream().wait();
      pack->version = version;
    }
    return pack->memory;
  }

  Entry& find_or_create(const MatmulShape& s) {
    for (Entry& e : entries_)
      if (e.shape == s) return e;
    using dims = dnnl::memory::dims;
    using tag = dnnl::memory::format_tag;
    const dnnl::memory::desc src_md(dims{s.M, s.K}, s.src_type, dims{s.src_ld, 1});
    const dnnl::memory::desc wei_plain(dims{s.K, s.N}, s.wei_type, dims{s.wei_s0, s.wei_s1});
    const dnnl::memory::desc wei_md =
        s.packed_weights ? dnnl::memory::desc(dims{s.K, s.N}, s.wei_type, tag::any) : wei_plain;
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
    e.wei = dnnl::memory(pd.weights_desc(), engine(), DNNL_MEMORY_NONE);
    e.dst = dnnl::memory(dst_md, engine(), DNNL_MEMORY_NONE);
    e.scratchpad = dnnl::memory(pd.scratchpad_desc(), engine());
    e.wei_plain = wei_plain;
    e.impl = pd.impl_info_str();
    impl_detail::note_implementation(e.impl);
    entries_.push_back(std::move(e));
    return entries_.back();
  }

  std::mutex mutex_;
  std::vector<Entry> entries_;
  std::vector<Pack> packs_;
};

/// Describes C (+)= W * B for column-major C (rows x n, ld c_ld), W (rows x depth, packed) and
/// B (depth x n, ld b_ld): oneDNN's C^T = B^T * W^T.
inline MatmulShape product_shape(Index rows, Index depth, Index n, Index b_ld, Index c_ld, dt type,
                                 bool accumulate, bool packed_weights = false) {
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
  s.packed_weights = packed_weights;
  return s;
}

/// Describes C (+)= W^T * B for column-major W (depth x cols, packed), B (depth x n, ld b_ld),
/// C (cols x n, ld c_ld): oneDNN's C^T = B^T * W, with W read through its strides.
inline MatmulShape transposed_product_shape(Index depth, Index cols, Index n, Index b_ld,
                                            Index c_ld, dt type, bool accumulate,
                                            bool packed_weights = false) {
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
  s.packed_weights = packed_weights;
  return s;
}

}  // namespace lora::onednn
