// Writing GGUF files the way ggml's own writer (gguf_write_to_file) lays them out: version 3,
// metadata in the order it was set, tensor infos in the order they were added, the data section
// at the aligned end of the infos, each tensor padded with zeros to the alignment. Files are
// replaced atomically (write_file_atomically): a failed save leaves the previous file as it was.
// Values carry their exact GGUF type (GgufValue), since llama.cpp aborts on a wrong one.
#pragma once

#include "lora/io/atomic_file.hpp"
#include "lora/io/dtype.hpp"
#include "lora/io/ggml_quants.hpp"
#include "lora/io/ggml_types.hpp"
#include "lora/io/gguf.hpp"
#include "lora/io/gguf_value.hpp"

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora::io {

/// Collects metadata and tensors, then writes them as one GGUF file.
///
///   GgufWriter w;
///   w.set("general.architecture", GgufValue::of(std::string("llama")));
///   w.set("llama.block_count", GgufValue::of(std::uint32_t{2}));
///   w.add_matrix("blk.0.attn_q.weight", Wq, GgmlType::F16);  // Wq: out x in -> ne = [in, out]
///   w.save("model.gguf");
class GgufWriter {
 public:
  /// Sets `key` to `value`: a new key goes after the others, an existing one keeps its place
  /// (as gguf_set_*). Throws std::invalid_argument for an empty key, an array of arrays, and a
  /// `general.alignment` that is not a u32 power of two.
  void set(const std::string& key, GgufValue value) {
    if (key.empty()) throw std::invalid_argument("GGUF writer: a metadata key is empty");
    if (value.is_array() && value.element_type() == GgufType::Array)
      throw std::invalid_argument("GGUF writer: " + detail::gguf_quote(key) +
                                  " is an array of arrays, which llama.cpp does not read");
    if (key == kGgufAlignmentKey) {
      if (value.type() != GgufType::U32)
        throw std::invalid_argument(std::string("GGUF writer: \"") + kGgufAlignmentKey +
                                    "\" must be u32, got " + value.type_string());
      const auto a = value.get<std::uint32_t>();
      if (a == 0 || (a & (a - 1)) != 0)
        throw std::invalid_argument(std::string("GGUF writer: \"") + kGgufAlignmentKey +
                                    "\" must be a power of two, got " + std::to_string(a));
      if (!tensors_.empty())
        throw std::invalid_argument(std::string("GGUF writer: set \"") + kGgufAlignmentKey +
                                    "\" before adding tensors");
      alignment_ = a;
    }
    const auto it = kv_index_.find(key);
    if (it != kv_index_.end()) {
      kv_[it->second].second = std::move(value);
      return;
    }
    kv_index_.emplace(key, kv_.size());
    kv_.emplace_back(key, std::move(value));
  }

  /// Shorthand for set(key, GgufValue::of(value)); `T` picks the GGUF type, so write the type
  /// llama.cpp reads: std::uint32_t{2}, 1e-5f, std::string("llama").
  template <typename T>
  void set_value(const std::string& key, const T& value) {
    set(key, GgufValue::of(value));
  }

  /// Whether `key` was set.
  bool has(const std::string& key) const { return kv_index_.count(key) != 0; }
  /// The metadata set so far, in order.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }

  /// Adds a tensor of `type` and shape `ne` (ggml's order, ne[0] fastest) from its raw bytes in
  /// ggml's layout (for a quantized type: its blocks). Throws std::invalid_argument for an empty,
  /// too long (more than 63 bytes) or duplicate name, more than 4 dimensions, a negative
  /// dimension, rows that are not whole blocks, or a byte count that does not match the shape.
  void add_tensor(const std::string& name, GgmlType type, std::vector<std::int64_t> ne,
                  std::vector<std::uint8_t> bytes) {
    const std::size_t expected = check_tensor(name, type, ne);
    if (bytes.size() != expected)
      throw std::invalid_argument("GGUF writer: tensor " + detail::gguf_quote(name) + " of type " +
                                  ggml_type_traits(type).name + " and shape " + ne_string(ne) +
                                  " needs " + std::to_string(expected) + " bytes, got " +
                                  std::to_string(bytes.size()));
    tensor_index_.emplace(name, tensors_.size());
    tensors_.push_back(Entry{name, type, std::move(ne), std::move(bytes)});
  }

  /// Adds the matrix `m` (rows x cols, e.g. a torch.nn.Linear weight, out x in) as a 2-D tensor
  /// with ne = [cols, rows], converted to `type`: F32, F16 or BF16 (rounded to nearest even), or
  /// Q8_0, Q4_0 (cols a multiple of 32), Q4_K, Q6_K (of 256) by ggml's reference quantizers
  /// (quantize_row_*_ref: the bytes llama-quantize writes without an importance matrix). Throws
  /// std::invalid_argument for another type and as add_tensor, std::domain_error (naming the
  /// tensor and the element) for a value that is not finite or that the type cannot hold (1e5 in
  /// F16, a block whose scale overflows fp16).
  template <typename Derived>
  void add_matrix(const std::string& name, const Eigen::MatrixBase<Derived>& m, GgmlType type) {
    add_values(name, m, type,
               {static_cast<std::int64_t>(m.cols()), static_cast<std::int64_t>(m.rows())});
  }

  /// Adds the vector `v` (a row or a column) as a 1-D tensor, ne = [n]; see add_matrix.
  template <typename Derived>
  void add_vector(const std::string& name, const Eigen::MatrixBase<Derived>& v, GgmlType type) {
    if (v.rows() != 1 && v.cols() != 1)
      throw std::invalid_argument("GGUF writer: " + detail::gguf_quote(name) +
                                  " must be a vector, got " + std::to_string(v.rows()) + " x " +
                                  std::to_string(v.cols()));
    add_values(name, v, type, {static_cast<std::int64_t>(v.size())});
  }

  /// Replaces tensor `name` (already added) by the matrix `m`, as add_matrix would write it; the
  /// tensor keeps its place. For writing a model with some weights changed (e.g. merged):
  /// `auto w = GgufWriter::copy_of(base); w.replace_matrix("blk.0.attn_q.weight", Wq, F32);`.
  /// Throws std::invalid_argument when there is no such tensor, and as add_matrix.
  template <typename Derived>
  void replace_matrix(const std::string& name, const Eigen::MatrixBase<Derived>& m, GgmlType type) {
    const auto it = tensor_index_.find(name);
    if (it == tensor_index_.end())
      throw std::invalid_argument("GGUF writer: no tensor " + detail::gguf_quote(name) +
                                  " to replace");
    std::vector<std::int64_t> ne{static_cast<std::int64_t>(m.cols()),
                                 static_cast<std::int64_t>(m.rows())};
    std::vector<std::uint8_t> bytes = encode(name, m, type, ne);
    tensors_[it->second] = Entry{name, type, std::move(ne), std::move(bytes)};
  }

  /// A writer holding everything `file` holds: its metadata (alignment included) and tensors
  /// (their raw bytes, any type), in the file's order; serialize() gives the file's bytes back
  /// when it was written by ggml's layout.
  static GgufWriter copy_of(const GgufFile& file) {
    GgufWriter w;
    for (const auto& [key, value] : file.metadata()) w.set(key, value);
    for (const auto& t : file.tensors()) w.add_tensor(t.name, t.type, t.ne, file.raw(t.name));
    return w;
  }

  /// Whether a tensor named `name` was added.
  bool contains(const std::string& name) const { return tensor_index_.count(name) != 0; }
  /// The number of tensors added.
  std::size_t size() const { return tensors_.size(); }

  /// The whole file as bytes.
  std::vector<std::uint8_t> serialize() const {
    const std::uint16_t one = 1;
    std::uint8_t first_byte;
    std::memcpy(&first_byte, &one, 1);
    if (first_byte != 1)
      throw std::runtime_error("GGUF writer: big-endian hosts are not supported");
    std::vector<std::uint8_t> out{'G', 'G', 'U', 'F'};  // kGgufMagic
    put(out, kGgufVersion);
    put(out, static_cast<std::int64_t>(tensors_.size()));
    put(out, static_cast<std::int64_t>(kv_.size()));
    for (const auto& [key, v] : kv_) {
      put_string(out, key);
      put(out, static_cast<std::int32_t>(v.type()));
      if (v.is_array()) {
        put(out, static_cast<std::int32_t>(v.element_type()));
        put(out, static_cast<std::uint64_t>(v.size()));
      }
      if (v.element_type() == GgufType::String) {
        for (const auto& s : v.strings()) put_string(out, s);
      } else {
        out.insert(out.end(), v.raw_bytes().begin(), v.raw_bytes().end());
      }
    }
    std::uint64_t offset = 0;
    for (const auto& t : tensors_) {
      put_string(out, t.name);
      put(out, static_cast<std::uint32_t>(t.ne.size()));
      for (auto d : t.ne) put(out, d);
      put(out, static_cast<std::int32_t>(t.type));
      put(out, offset);
      offset += padded(t.bytes.size());
    }
    out.resize(padded(out.size()), 0);
    for (const auto& t : tensors_) {
      out.insert(out.end(), t.bytes.begin(), t.bytes.end());
      out.resize(padded(out.size()), 0);
    }
    return out;
  }

  /// Writes the file atomically (see write_file_atomically): on failure, throws WriteError and
  /// leaves any previous file at `path` unchanged.
  void save(const std::string& path) const {
    const std::vector<std::uint8_t> bytes = serialize();
    write_file_atomically(path, bytes.data(), bytes.size());
  }

 private:
  struct Entry {
    std::string name;
    GgmlType type;
    std::vector<std::int64_t> ne;
    std::vector<std::uint8_t> bytes;
  };

  static std::string ne_string(const std::vector<std::int64_t>& ne) {
    std::ostringstream s;
    s << "ne [";
    for (std::size_t i = 0; i < ne.size(); ++i) s << (i ? ", " : "") << ne[i];
    s << "]";
    return s.str();
  }

  std::size_t check_tensor(const std::string& name, GgmlType type,
                           const std::vector<std::int64_t>& ne) const {
    const std::size_t n = check_shape(name, type, ne);
    if (contains(name))
      throw std::invalid_argument("GGUF writer: tensor " + detail::gguf_quote(name) +
                                  " added twice");
    return n;
  }

  std::size_t check_shape(const std::string& name, GgmlType type,
                          const std::vector<std::int64_t>& ne) const {
    const std::string where = "GGUF writer: tensor " + detail::gguf_quote(name);
    if (name.empty()) throw std::invalid_argument("GGUF writer: a tensor name is empty");
    if (name.size() > kGgufMaxNameBytes)
      throw std::invalid_argument(where + ": the name is " + std::to_string(name.size()) +
                                  " bytes, ggml allows at most 63");
    if (ne.size() > kGgufMaxDims)
      throw std::invalid_argument(where + " has " + std::to_string(ne.size()) +
                                  " dimensions, ggml allows 4");
    const GgmlTypeTraits& traits = ggml_type_traits(type);
    std::uint64_t numel = 1;
    bool empty = false;  // a zero dimension anywhere: no elements, however large the others
    for (auto d : ne) {
      if (d < 0) throw std::invalid_argument(where + " has a negative dimension: " + ne_string(ne));
      if (d == 0) empty = true;
    }
    for (auto d : ne) {
      if (empty) {
        numel = 0;
        break;
      }
      if (numel > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) /
                      static_cast<std::uint64_t>(d))
        throw std::invalid_argument(where + "'s shape " + ne_string(ne) + " overflows");
      numel *= static_cast<std::uint64_t>(d);
    }
    const std::int64_t ne0 = ne.empty() ? 1 : ne[0];
    if (ne0 % traits.block_size != 0)
      throw std::invalid_argument(where + " of type " + traits.name + " has rows of " +
                                  std::to_string(ne0) + " values, not a multiple of its block of " +
                                  std::to_string(traits.block_size));
    return static_cast<std::size_t>(numel / traits.block_size * traits.type_size);
  }

  template <typename Derived>
  void add_values(const std::string& name, const Eigen::MatrixBase<Derived>& m, GgmlType type,
                  std::vector<std::int64_t> ne) {
    std::vector<std::uint8_t> bytes = encode(name, m, type, ne);
    if (contains(name))
      throw std::invalid_argument("GGUF writer: tensor " + detail::gguf_quote(name) +
                                  " added twice");
    tensor_index_.emplace(name, tensors_.size());
    tensors_.push_back(Entry{name, type, std::move(ne), std::move(bytes)});
  }

  /// The bytes of m (rows x cols) as `type` in ggml's order, after the checks of add_matrix.
  template <typename Derived>
  std::vector<std::uint8_t> encode(const std::string& name, const Eigen::MatrixBase<Derived>& m,
                                   GgmlType type, const std::vector<std::int64_t>& ne) const {
    using Scalar = typename Derived::Scalar;
    static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                  "GGUF writer: tensors must hold float or double");
    if (!ggml::can_quantize(type))
      throw std::invalid_argument("GGUF writer: tensor " + detail::gguf_quote(name) +
                                  ": lora writes f32, f16, bf16, q8_0, q4_0, q4_K and q6_K, not " +
                                  ggml_type_traits(type).name);
    const std::size_t nbytes = check_shape(name, type, ne);
    // The elements in ggml's order: row by row of m (ne[0] = cols is the fastest axis).
    const auto rows = m.rows(), cols = m.cols();
    std::vector<float> f;
    std::vector<std::uint8_t> bytes;
    bytes.reserve(nbytes);
    auto overflow = [&](Eigen::Index i, Eigen::Index j, double v, const char* what) {
      std::ostringstream s;
      s.precision(17);
      s << "GGUF writer: tensor " << detail::gguf_quote(name) << " holds " << v << " at [" << i
        << ", " << j << "], " << what;
      throw std::domain_error(s.str());
    };
    for (Eigen::Index i = 0; i < rows; ++i)
      for (Eigen::Index j = 0; j < cols; ++j) {
        const Scalar v = m(i, j);
        if (!std::isfinite(v)) overflow(i, j, static_cast<double>(v), "which is not finite");
        std::uint16_t h = 0;
        switch (type) {
          case GgmlType::F32: {
            const auto x = static_cast<float>(v);
            if (!std::isfinite(x))
              overflow(i, j, static_cast<double>(v), "beyond the range of f32");
            put(bytes, x);
            break;
          }
          case GgmlType::F16:
            h = std::is_same_v<Scalar, double> ? double_to_f16(static_cast<double>(v))
                                               : float_to_f16(static_cast<float>(v));
            if ((h & 0x7c00u) == 0x7c00u)
              overflow(i, j, static_cast<double>(v), "beyond the range of f16 (65504)");
            put(bytes, h);
            break;
          case GgmlType::BF16:
            h = std::is_same_v<Scalar, double> ? double_to_bf16(static_cast<double>(v))
                                               : float_to_bf16(static_cast<float>(v));
            if ((h & 0x7f80u) == 0x7f80u)
              overflow(i, j, static_cast<double>(v), "beyond the range of bf16");
            put(bytes, h);
            break;
          default: {  // a block type: quantized from float, as ggml does
            const auto x = static_cast<float>(v);
            if (!std::isfinite(x))
              overflow(i, j, static_cast<double>(v), "beyond the range of f32");
            f.push_back(x);
          }
        }
      }
    if (ggml_type_traits(type).block_size > 1) {
      bytes.resize(nbytes);
      ggml::quantize(type, f.data(), bytes.data(), f.size());
      // A block whose scale does not fit fp16 (|x| near 65504 times the type's largest level)
      // would dequantize to inf or NaN in llama.cpp: refused, with the block's place.
      const GgmlTypeTraits& t = ggml_type_traits(type);
      std::vector<float> back(t.block_size);
      for (std::size_t b = 0; b * t.block_size < f.size(); ++b) {
        ggml::dequantize(type, bytes.data() + b * t.type_size, back.data(), t.block_size);
        for (float x : back)
          if (!std::isfinite(x)) {
            const auto first = static_cast<Eigen::Index>(b * t.block_size);
            overflow(first / cols, first % cols, static_cast<double>(m(first / cols, first % cols)),
                     (std::string("in a block whose ") + t.name + " scale overflows f16").c_str());
          }
      }
    }
    return bytes;
  }

  template <typename V>
  static void put(std::vector<std::uint8_t>& out, const V& v) {
    const auto* b = reinterpret_cast<const std::uint8_t*>(&v);
    out.insert(out.end(), b, b + sizeof(V));
  }
  static void put_string(std::vector<std::uint8_t>& out, const std::string& s) {
    put(out, static_cast<std::uint64_t>(s.size()));
    out.insert(out.end(), s.begin(), s.end());
  }
  std::size_t padded(std::size_t n) const { return (n + alignment_ - 1) / alignment_ * alignment_; }

  std::uint32_t alignment_ = kGgufDefaultAlignment;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::map<std::string, std::size_t> kv_index_;
  std::vector<Entry> tensors_;
  std::map<std::string, std::size_t> tensor_index_;
};

}  // namespace lora::io
