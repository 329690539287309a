// Reading GGUF files, llama.cpp's model and adapter format (ggml/src/gguf.cpp is the reference
// loader). Layout, all little-endian:
//   "GGUF", u32 version (2 or 3), i64 n_tensors, i64 n_kv,
//   n_kv x (key: u64 length + bytes, i32 value type, value),
//   n_tensors x (name: u64 length + bytes, u32 n_dims, n_dims x i64 ne, i32 ggml type, u64 offset),
//   padding to `general.alignment` (u32, a power of two, default 32), the data section.
// A string is a u64 length and its bytes; an array is an i32 element type, a u64 count and the
// elements. ne[0] is the fastest-varying axis: a PyTorch (out, in) weight has ne = [in, out].
// Tensors lie packed in the data section in info order, each padded to the alignment.
//
// Every count, length, offset and product is checked against the file before it is used, with the
// rules of llama.cpp's loader (keys non-empty and unique, no nested arrays, names shorter than 64
// bytes and unique, n_dims <= 4, known ggml types, whole blocks per row, offsets exactly where the
// packing puts them, every tensor inside the file): anything else is a FormatError that names the
// field and its byte offset, never an out-of-bounds read or an unbounded allocation.
#pragma once

#include "lora/io/dtype.hpp"
#include "lora/io/format_error.hpp"
#include "lora/io/ggml_quants.hpp"
#include "lora/io/ggml_types.hpp"
#include "lora/io/gguf_value.hpp"
#include "lora/io/read_file.hpp"

#include <Eigen/Core>

#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace lora::io {

/// GGUF's magic, the first four bytes of every file.
inline constexpr char kGgufMagic[4] = {'G', 'G', 'U', 'F'};
/// The GGUF version lora writes (and the newest it reads; version 2 has the same layout).
inline constexpr std::uint32_t kGgufVersion = 3;
/// The alignment of the data section and of each tensor when `general.alignment` is absent.
inline constexpr std::uint32_t kGgufDefaultAlignment = 32;
/// The key that sets the alignment (u32, a power of two).
inline constexpr const char* kGgufAlignmentKey = "general.alignment";
/// ggml's limit on tensor names (GGML_MAX_NAME, with the terminating NUL): at most 63 bytes.
inline constexpr std::size_t kGgufMaxNameBytes = 63;
/// ggml's most dimensions (GGML_MAX_DIMS).
inline constexpr std::uint32_t kGgufMaxDims = 4;
/// llama.cpp's limits on one string and on one array's elements (1 GiB each).
inline constexpr std::uint64_t kGgufMaxStringBytes = 1024ull * 1024 * 1024;
/// See kGgufMaxStringBytes.
inline constexpr std::uint64_t kGgufMaxArrayElements = 1024ull * 1024 * 1024;

/// One tensor's info: its name, shape in ggml's order, type and place in the data section.
struct GgufTensorInfo {
  std::string name;               ///< e.g. "blk.0.attn_q.weight"
  std::vector<std::int64_t> ne;   ///< shape, fastest-varying axis first (n_dims entries)
  GgmlType type = GgmlType::F32;  ///< ggml's type of the elements
  std::uint64_t offset = 0;       ///< first byte, from the start of the data section
  std::size_t bytes = 0;          ///< the tensor's bytes (without the padding after it)

  /// The number of elements (the product of ne; 1 for n_dims 0). A shape with a zero dimension
  /// has none, however large the others are (e.g. [2^36, 2^61, 0]: found by fuzzing); otherwise
  /// the product was checked against overflow when the file was read.
  std::int64_t numel() const {
    for (auto d : ne)
      if (d == 0) return 0;
    std::int64_t n = 1;
    for (auto d : ne) n *= d;
    return n;
  }
  /// ne[i], or 1 past n_dims (as ggml pads shapes to 4 dimensions).
  std::int64_t dim(std::size_t i) const { return i < ne.size() ? ne[i] : 1; }
  /// Whether the tensor is a matrix: ne[2] and ne[3] are 1 (a vector counts as one row).
  bool is_matrix() const { return dim(2) == 1 && dim(3) == 1; }
  /// Rows of the matrix it holds: ne[1] (PyTorch's out features for a weight).
  std::int64_t rows() const { return dim(1); }
  /// Columns of the matrix it holds: ne[0] (PyTorch's in features).
  std::int64_t cols() const { return dim(0); }
  /// The shape as text, ggml's order: "[64, 128] (ne)".
  std::string shape_string() const {
    std::ostringstream s;
    s << "ne [";
    for (std::size_t i = 0; i < ne.size(); ++i) s << (i ? ", " : "") << ne[i];
    s << "]";
    return s.str();
  }
};

namespace detail {

/// Reads little-endian fields from a byte buffer; every read is bounds-checked and a failure
/// names the field and its offset.
class GgufCursor {
 public:
  GgufCursor(const std::uint8_t* data, std::size_t size, const std::string& source)
      : data_(data), size_(size), source_(source) {}

  std::size_t pos() const { return pos_; }
  std::size_t remaining() const { return size_ - pos_; }
  void seek(std::size_t p) { pos_ = p; }

  [[noreturn]] void fail_at(std::size_t at, const std::string& what) const {
    throw FormatError("GGUF: \"" + source_ + "\": " + what + " (at byte offset " +
                      std::to_string(at) + ")");
  }

  template <typename T>
  T read(const std::string& field) {
    if (remaining() < sizeof(T))
      fail_at(pos_, field + " needs " + std::to_string(sizeof(T)) + " bytes but the file ends " +
                        "after " + std::to_string(remaining()));
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  std::string read_string(const std::string& field) {
    const std::size_t at = pos_;
    const auto n = read<std::uint64_t>(field + "'s length");
    if (n > kGgufMaxStringBytes)
      fail_at(at, field + " has length " + std::to_string(n) + ", more than the 1 GiB limit");
    if (n > remaining())
      fail_at(at, field + " has length " + std::to_string(n) + " but only " +
                      std::to_string(remaining()) + " bytes follow");
    std::string s(reinterpret_cast<const char*>(data_ + pos_), static_cast<std::size_t>(n));
    pos_ += static_cast<std::size_t>(n);
    return s;
  }

  std::vector<std::uint8_t> read_bytes(std::size_t n) {
    std::vector<std::uint8_t> out(data_ + pos_, data_ + pos_ + n);  // n checked by the caller
    pos_ += n;
    return out;
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
  const std::string& source_;
};

inline bool gguf_valid_value_type(std::int32_t t) {
  return t >= 0 && t <= 12;
}

/// Dequantizes `n` values of `type` at `p` into floats as ggml does (bit for bit), or returns
/// false when lora cannot convert the type (see ggml::can_dequantize).
inline bool ggml_to_float(GgmlType type, const std::uint8_t* p, float* out, std::size_t n) {
  if (!ggml::can_dequantize(type)) return false;
  if (n > 0) ggml::dequantize(type, p, out, n);  // out is null for an empty tensor
  return true;
}

}  // namespace detail

/// A GGUF file held in memory: its metadata (in file order), tensor infos (in file order) and
/// data.
///
///   const auto f = lora::io::GgufFile::load("model.gguf");
///   f.get<std::string>("general.architecture");          // "llama"
///   f.get<std::uint32_t>("llama.block_count");           // exact type, as llama.cpp reads it
///   Eigen::MatrixXf Wq = f.matrix<float>("blk.0.attn_q.weight");  // out x in
class GgufFile {
 public:
  /// Reads and validates the file at `path` (see read_file for what cannot be read).
  static GgufFile load(const std::string& path) { return parse(read_file(path, "GGUF"), path); }

  /// Validates `bytes` as a GGUF file; `source` names it in error messages.
  static GgufFile parse(std::vector<std::uint8_t> bytes, const std::string& source = "<memory>") {
    GgufFile f;
    f.source_ = source;
    f.bytes_ = std::move(bytes);
    f.parse_all();
    return f;
  }

  /// The name given to load or parse.
  const std::string& source() const { return source_; }
  /// The file's GGUF version (2 or 3).
  std::uint32_t version() const { return version_; }
  /// The alignment of the data section and tensors.
  std::uint32_t alignment() const { return alignment_; }
  /// Where the data section starts, from the start of the file.
  std::size_t data_offset() const { return data_offset_; }

  /// The metadata in file order.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  /// Whether the file has the key.
  bool has(const std::string& key) const { return kv_index_.count(key) != 0; }
  /// The value of `key`; throws FormatError when there is none.
  const GgufValue& value(const std::string& key) const {
    const auto it = kv_index_.find(key);
    if (it == kv_index_.end())
      throw FormatError("GGUF: \"" + source_ + "\" has no metadata key " + detail::gguf_quote(key));
    return kv_[it->second].second;
  }
  /// The scalar of `key`, of exactly T's GGUF type (see GgufValue::get); throws FormatError
  /// naming the key when it is missing or of another type.
  template <typename T>
  T get(const std::string& key) const {
    try {
      return value(key).get<T>();
    } catch (const FormatError& e) {
      if (!has(key)) throw;
      throw FormatError("GGUF: \"" + source_ + "\": metadata " + detail::gguf_quote(key) + ": " +
                        e.what());
    }
  }
  /// As get, or `fallback` when the key is missing (a present key of another type still throws).
  template <typename T>
  T get_or(const std::string& key, const T& fallback) const {
    return has(key) ? get<T>(key) : fallback;
  }
  /// The array of `key`, of exactly T's GGUF type; throws FormatError otherwise.
  template <typename T>
  std::vector<T> get_array(const std::string& key) const {
    try {
      return value(key).get_array<T>();
    } catch (const FormatError& e) {
      if (!has(key)) throw;
      throw FormatError("GGUF: \"" + source_ + "\": metadata " + detail::gguf_quote(key) + ": " +
                        e.what());
    }
  }

  /// The tensor infos in file order.
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  /// Whether the file holds a tensor named `name`.
  bool contains(const std::string& name) const { return tensor_index_.count(name) != 0; }
  /// The info of tensor `name`; throws FormatError when there is none.
  const GgufTensorInfo& info(const std::string& name) const {
    const auto it = tensor_index_.find(name);
    if (it == tensor_index_.end())
      throw FormatError("GGUF: \"" + source_ + "\" has no tensor " + detail::gguf_quote(name));
    return tensors_[it->second];
  }
  /// The first byte of tensor `name`'s data (info(name).bytes of them; the raw blocks of a
  /// quantized type, in ggml's layout).
  const std::uint8_t* data(const std::string& name) const {
    return bytes_.data() + data_offset_ + info(name).offset;
  }
  /// A copy of tensor `name`'s raw bytes.
  std::vector<std::uint8_t> raw(const std::string& name) const {
    const std::uint8_t* p = data(name);
    return std::vector<std::uint8_t>(p, p + info(name).bytes);
  }

  /// Whether lora can convert tensors of `type` to floats: F32, F16, BF16, F64, and the block
  /// types Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K; the other types are handed out raw by data/raw.
  static bool can_convert(GgmlType type) {
    return type == GgmlType::F64 || ggml::can_dequantize(type);
  }

  /// Every element of tensor `name`, in the file's order (ne[0] fastest), converted to T: F32,
  /// F16, BF16 and F64 exactly, the block types dequantized as ggml does (bit for bit). Other
  /// types throw FormatError ("cannot dequantize": read their blocks with data or raw). A
  /// block's non-finite fp16 scale gives non-finite values, as in ggml.
  template <typename T>
  std::vector<T> values(const std::string& name) const {
    const GgufTensorInfo& t = info(name);
    const auto n = static_cast<std::size_t>(t.numel());
    std::vector<T> out(n);
    const std::uint8_t* p = data(name);
    if (t.type == GgmlType::F64) {
      for (std::size_t i = 0; i < n; ++i) {
        double v;
        std::memcpy(&v, p + 8 * i, 8);
        out[i] = static_cast<T>(v);
      }
      return out;
    }
    if constexpr (std::is_same_v<T, float>) {
      if (!detail::ggml_to_float(t.type, p, out.data(), n)) unsupported(t);
    } else {
      std::vector<float> f(n);
      if (!detail::ggml_to_float(t.type, p, f.data(), n)) unsupported(t);
      for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<T>(f[i]);
    }
    return out;
  }

  /// A 2-D tensor (ne = [cols, rows]; ne[2] = ne[3] = 1) as an Eigen matrix of rows x cols: a
  /// weight stored by llama.cpp with ne = [in, out] comes back out x in, as torch.nn.Linear's.
  template <typename T>
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> matrix(const std::string& name) const {
    const GgufTensorInfo& t = info(name);
    if (!t.is_matrix())
      throw FormatError("GGUF: \"" + source_ + "\": tensor " + detail::gguf_quote(name) +
                        " is not a matrix: " + t.shape_string());
    // Empty: nothing to copy. (A copy would still walk the other dimension, which the file may
    // set to 2^62 at no cost in bytes.)
    if (t.rows() == 0 || t.cols() == 0)
      return Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>(t.rows(), t.cols());
    const std::vector<T> v = values<T>(name);
    using RowMajor = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    return Eigen::Map<const RowMajor>(v.data(), t.rows(), t.cols());
  }

 private:
  [[noreturn]] void unsupported(const GgufTensorInfo& t) const {
    throw FormatError("GGUF: \"" + source_ + "\": tensor " + detail::gguf_quote(t.name) +
                      " has ggml type " + ggml_type_traits(t.type).name +
                      ", which lora cannot dequantize (supported: f32, f16, bf16, f64, q8_0, "
                      "q4_0, q5_0, q4_K, q5_K, q6_K); its raw blocks are available with "
                      "GgufFile::data / raw");
  }

  static bool is_little_endian() {
    const std::uint16_t one = 1;
    std::uint8_t first;
    std::memcpy(&first, &one, 1);
    return first == 1;
  }

  GgufValue read_value(detail::GgufCursor& c, const std::string& key) {
    const std::string field = "the value of " + detail::gguf_quote(key);
    const std::size_t type_at = c.pos();
    const auto raw_type = c.read<std::int32_t>(field + "'s type");
    if (!detail::gguf_valid_value_type(raw_type))
      c.fail_at(type_at, field + " has type " + std::to_string(raw_type) +
                             ", not a GGUF value type (0 to 12)");
    bool array = false;
    auto type = static_cast<GgufType>(raw_type);
    std::uint64_t count = 1;
    if (type == GgufType::Array) {
      array = true;
      const std::size_t elem_at = c.pos();
      const auto raw_elem = c.read<std::int32_t>(field + "'s element type");
      if (raw_elem == static_cast<std::int32_t>(GgufType::Array))
        c.fail_at(elem_at, field + " is an array of arrays, which llama.cpp does not read");
      if (!detail::gguf_valid_value_type(raw_elem))
        c.fail_at(elem_at, field + " has element type " + std::to_string(raw_elem) +
                               ", not a GGUF value type (0 to 12)");
      type = static_cast<GgufType>(raw_elem);
      const std::size_t count_at = c.pos();
      count = c.read<std::uint64_t>(field + "'s element count");
      if (count > kGgufMaxArrayElements)
        c.fail_at(count_at, field + " has " + std::to_string(count) +
                                " elements, more than the limit of 2^30");
      // Each element takes at least its fixed size (a string at least its 8-byte length).
      const std::uint64_t least = type == GgufType::String ? 8 : gguf_type_size(type);
      if (count > c.remaining() / least)
        c.fail_at(count_at, field + " has " + std::to_string(count) + " elements of " +
                                gguf_type_name(type) + " but only " +
                                std::to_string(c.remaining()) + " bytes follow");
    }
    if (type == GgufType::String) {
      std::vector<std::string> strings;
      for (std::uint64_t i = 0; i < count; ++i)
        strings.push_back(c.read_string(array ? field + "[" + std::to_string(i) + "]" : field));
      return GgufValue::from_parts(array, type, count, {}, std::move(strings));
    }
    const std::size_t n = static_cast<std::size_t>(count) * gguf_type_size(type);
    if (n > c.remaining())
      c.fail_at(c.pos(), field + " needs " + std::to_string(n) + " bytes but only " +
                             std::to_string(c.remaining()) + " follow");
    return GgufValue::from_parts(array, type, count, c.read_bytes(n), {});
  }

  void parse_all() {
    static_assert(sizeof(std::size_t) >= 8, "lora::io needs a 64-bit size_t");
    detail::GgufCursor c(bytes_.data(), bytes_.size(), source_);
    auto fail = [&](std::size_t at, const std::string& what) { c.fail_at(at, what); };
    if (!is_little_endian()) fail(0, "big-endian hosts are not supported");
    if (bytes_.size() < 4 || std::memcmp(bytes_.data(), kGgufMagic, 4) != 0)
      fail(0, "not a GGUF file: it does not start with the magic \"GGUF\"");
    c.seek(4);
    version_ = c.read<std::uint32_t>("the version");
    if ((version_ & 0xFFFFu) == 0 && version_ != 0)
      fail(4, "version " + std::to_string(version_) +
                  " looks byte-swapped: a big-endian GGUF file, which llama.cpp cannot read");
    if (version_ != 2 && version_ != 3)
      fail(4, "version " + std::to_string(version_) + " is not supported (GGUF 2 and 3 are)");
    const auto n_tensors = c.read<std::int64_t>("the tensor count");
    if (n_tensors < 0) fail(8, "the tensor count " + std::to_string(n_tensors) + " is negative");
    const auto n_kv = c.read<std::int64_t>("the metadata count");
    if (n_kv < 0) fail(16, "the metadata count " + std::to_string(n_kv) + " is negative");
    // A key-value pair takes at least 8 + 1 + 4 + 1 bytes, a tensor info 8 + 1 + 4 + 4 + 8: a
    // count beyond what the file can hold is refused before anything is allocated for it.
    if (static_cast<std::uint64_t>(n_kv) > c.remaining() / 14)
      fail(16, "the metadata count " + std::to_string(n_kv) + " cannot fit in the " +
                   std::to_string(c.remaining()) + " bytes that follow");
    if (static_cast<std::uint64_t>(n_tensors) > c.remaining() / 25)
      fail(8, "the tensor count " + std::to_string(n_tensors) + " cannot fit in the " +
                  std::to_string(c.remaining()) + " bytes that follow");

    std::size_t alignment_at = 0;
    for (std::int64_t i = 0; i < n_kv; ++i) {
      const std::size_t at = c.pos();
      std::string key = c.read_string("metadata key " + std::to_string(i));
      if (key.empty()) fail(at, "metadata key " + std::to_string(i) + " is empty");
      if (kv_index_.count(key))
        fail(at, "metadata key " + detail::gguf_quote(key) + " appears twice");
      if (key == kGgufAlignmentKey) alignment_at = at;
      GgufValue v = read_value(c, key);
      kv_index_.emplace(key, kv_.size());
      kv_.emplace_back(std::move(key), std::move(v));
    }

    alignment_ = kGgufDefaultAlignment;
    if (has(kGgufAlignmentKey)) {
      const GgufValue& a = value(kGgufAlignmentKey);
      if (a.type() != GgufType::U32)
        fail(alignment_at, std::string("metadata \"") + kGgufAlignmentKey + "\" must be u32, got " +
                               a.type_string());
      alignment_ = a.get<std::uint32_t>();
      if (alignment_ == 0 || (alignment_ & (alignment_ - 1)) != 0)
        fail(alignment_at, std::string("metadata \"") + kGgufAlignmentKey + "\" is " +
                               std::to_string(alignment_) + ", not a power of two");
    }

    std::uint64_t expected_offset = 0;  // where the packing puts the next tensor
    for (std::int64_t i = 0; i < n_tensors; ++i) {
      const std::size_t at = c.pos();
      GgufTensorInfo t;
      t.name = c.read_string("tensor name " + std::to_string(i));
      const std::string where = "tensor " + detail::gguf_quote(t.name);
      if (t.name.empty()) fail(at, "tensor name " + std::to_string(i) + " is empty");
      if (t.name.size() > kGgufMaxNameBytes)
        fail(at, where + ": the name is " + std::to_string(t.name.size()) +
                     " bytes, ggml allows at most 63");
      if (tensor_index_.count(t.name)) fail(at, where + " appears twice");
      const std::size_t dims_at = c.pos();
      const auto n_dims = c.read<std::uint32_t>(where + "'s n_dims");
      if (n_dims > kGgufMaxDims)
        fail(dims_at, where + " has " + std::to_string(n_dims) + " dimensions, ggml allows 4");
      std::uint64_t numel = 1;
      bool empty = false;
      for (std::uint32_t d = 0; d < n_dims; ++d) {
        const std::size_t ne_at = c.pos();
        const auto ne = c.read<std::int64_t>(where + "'s ne[" + std::to_string(d) + "]");
        if (ne < 0)
          fail(ne_at,
               where + "'s ne[" + std::to_string(d) + "] is " + std::to_string(ne) + ", negative");
        t.ne.push_back(ne);
        if (ne == 0) empty = true;
      }
      if (!empty) {
        for (auto ne : t.ne) {
          if (numel > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) /
                          static_cast<std::uint64_t>(ne))
            fail(dims_at, where + "'s shape " + t.shape_string() + " has more than 2^63 elements");
          numel *= static_cast<std::uint64_t>(ne);
        }
      } else {
        numel = 0;
      }
      const std::size_t type_at = c.pos();
      const auto raw_type = c.read<std::int32_t>(where + "'s type");
      const GgmlTypeTraits* traits =
          raw_type < 0 ? nullptr : ggml_type_traits(static_cast<std::uint32_t>(raw_type));
      if (traits == nullptr)
        fail(type_at,
             where + " has ggml type " + std::to_string(raw_type) + ", which ggml does not know");
      t.type = traits->type;
      const std::int64_t ne0 = t.dim(0);
      if (ne0 % traits->block_size != 0)
        fail(type_at, where + " of type " + traits->name + " has rows of " + std::to_string(ne0) +
                          " values, not a multiple of its block of " +
                          std::to_string(traits->block_size));
      const std::uint64_t blocks = numel / traits->block_size;
      if (blocks > std::numeric_limits<std::uint64_t>::max() / traits->type_size)
        fail(type_at, where + "'s size in bytes overflows");
      const std::uint64_t nbytes = blocks * traits->type_size;
      t.bytes = static_cast<std::size_t>(nbytes);
      const std::size_t offset_at = c.pos();
      t.offset = c.read<std::uint64_t>(where + "'s offset");
      if (t.offset != expected_offset)
        fail(offset_at, where + " has offset " + std::to_string(t.offset) +
                            "; the tensors before it end at " + std::to_string(expected_offset) +
                            " (GGUF tensors lie packed in info order, each padded to " +
                            std::to_string(alignment_) + " bytes)");
      const std::uint64_t padded = pad(nbytes);
      if (padded < nbytes || expected_offset > std::numeric_limits<std::uint64_t>::max() - padded)
        fail(offset_at, where + "'s size overflows the data section");
      expected_offset += padded;
      tensor_index_.emplace(t.name, tensors_.size());
      tensors_.push_back(std::move(t));
    }

    data_offset_ = c.pos();
    if (n_tensors > 0) {
      data_offset_ = static_cast<std::size_t>(pad(c.pos()));
      if (data_offset_ > bytes_.size())
        fail(c.pos(), "the data section would start at " + std::to_string(data_offset_) +
                          ", past the end of the file (" + std::to_string(bytes_.size()) +
                          " bytes)");
    }
    const std::uint64_t data_size = bytes_.size() - data_offset_;
    for (const auto& t : tensors_)
      if (t.offset > data_size || t.bytes > data_size - t.offset)
        fail(data_offset_ + (t.offset < data_size ? t.offset : data_size),
             "tensor " + detail::gguf_quote(t.name) + " (" + std::to_string(t.bytes) +
                 " bytes at data offset " + std::to_string(t.offset) +
                 ") runs past the end of the file (the data section has " +
                 std::to_string(data_size) + " bytes)");
  }

  std::uint64_t pad(std::uint64_t n) const {
    const std::uint64_t a = alignment_;
    if (n > std::numeric_limits<std::uint64_t>::max() - (a - 1)) return 0;  // caller sees < n
    return (n + a - 1) / a * a;
  }

  std::string source_;
  std::vector<std::uint8_t> bytes_;
  std::uint32_t version_ = 0;
  std::uint32_t alignment_ = kGgufDefaultAlignment;
  std::size_t data_offset_ = 0;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::map<std::string, std::size_t> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, std::size_t> tensor_index_;
};

}  // namespace lora::io
