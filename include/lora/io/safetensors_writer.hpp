// Writing safetensors files, byte for byte the way the Python `safetensors` library does:
// an 8-byte little-endian header length N, a compact JSON header ({"__metadata__": {...}} first,
// then one {"dtype","shape","data_offsets"} entry per tensor) padded with spaces to a multiple of
// 8 bytes, then the tensors' data, row-major like PyTorch. Tensors are laid out as the Python
// library orders them: by dtype, widest first, then by name. Files are replaced atomically.
#pragma once

#include "lora/detail/compiled_mode.hpp"
#include "lora/io/atomic_file.hpp"
#include "lora/io/dtype.hpp"
#include "lora/io/safetensors.hpp"

#include <Eigen/Core>
#if LORA_WITH_BODIES
#include <nlohmann/json.hpp>
#endif

#include <algorithm>
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

namespace detail {

/// The order of the Rust `Dtype` enum, which the Python library sorts by (descending).
LORA_FUNC int dtype_sort_rank(DType t);

/// Appends v converted to `dtype`; returns false when a finite v became an infinity (beyond the
/// dtype's range: 65504 for F16, about 3.4e38 for F32 and BF16).
template <typename Scalar>
bool append_value(std::vector<std::uint8_t>& out, DType dtype, Scalar v) {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "safetensors writer: tensors must hold float or double");
  auto put = [&out](const auto& x) {
    const auto* b = reinterpret_cast<const std::uint8_t*>(&x);
    out.insert(out.end(), b, b + sizeof x);
  };
  const bool finite = std::isfinite(v);
  switch (dtype) {
    case DType::F64:
      put(static_cast<double>(v));
      return true;
    case DType::F32: {
      const auto f = static_cast<float>(v);  // IEEE: round to nearest even
      put(f);
      return !finite || std::isfinite(f);
    }
    case DType::F16: {
      const std::uint16_t h = std::is_same_v<Scalar, double> ? double_to_f16(static_cast<double>(v))
                                                             : float_to_f16(static_cast<float>(v));
      put(h);
      return !finite || (h & 0x7c00u) != 0x7c00u;
    }
    case DType::BF16: {
      const std::uint16_t h = std::is_same_v<Scalar, double>
                                  ? double_to_bf16(static_cast<double>(v))
                                  : float_to_bf16(static_cast<float>(v));
      put(h);
      return !finite || (h & 0x7f80u) != 0x7f80u;
    }
    default:
      throw std::invalid_argument(std::string("safetensors writer: cannot write dtype ") +
                                  dtype_name(dtype) + "; use F64, F32, F16 or BF16");
  }
}

/// Throws std::domain_error: a finite value of tensor `name` at `index` overflows `dtype`.
[[noreturn]] LORA_FUNC void throw_overflow(const std::string& name, const std::string& index,
                                           double value, DType dtype);

#if LORA_WITH_BODIES

LORA_FUNC int dtype_sort_rank(DType t) {
  switch (t) {
    case DType::BOOL:
      return 0;
    case DType::U8:
      return 1;
    case DType::I8:
      return 2;
    case DType::F8_E5M2:
      return 3;
    case DType::F8_E4M3:
      return 4;
    case DType::I16:
      return 5;
    case DType::U16:
      return 6;
    case DType::F16:
      return 7;
    case DType::BF16:
      return 8;
    case DType::I32:
      return 9;
    case DType::U32:
      return 10;
    case DType::F32:
      return 11;
    case DType::F64:
      return 12;
    case DType::I64:
      return 13;
    case DType::U64:
      return 14;
  }
  return 0;
}

LORA_FUNC void throw_overflow(const std::string& name, const std::string& index, double value,
                              DType dtype) {
  std::ostringstream s;
  s.precision(17);
  s << "safetensors writer: tensor " << quote_for_message(name) << " holds " << value << " at "
    << index << ", beyond the range of " << dtype_name(dtype)
    << " (it would be stored as infinity); scale the values or save a wider dtype";
  throw std::domain_error(s.str());
}

#endif  // LORA_WITH_BODIES

}  // namespace detail

/// Collects tensors and metadata, then writes them as one safetensors file.
///
///   SafeTensorsWriter w;
///   w.set_metadata("format", "pt");
///   w.add("lora_A", A, DType::F32);   // A: r x k Eigen matrix, stored row-major [r, k]
///   w.save("adapter_model.safetensors");
class SafeTensorsWriter {
 public:
  /// Adds a 2-D tensor of shape [rows, cols] holding m (converted to `dtype`, F16/BF16 rounded to
  /// nearest even). Throws std::invalid_argument for a duplicate or empty name or a dtype other
  /// than F64/F32/F16/BF16, and std::domain_error (naming the tensor and the index) for a finite
  /// value that the dtype cannot hold (1e5 in F16 would be stored as infinity). Non-finite values
  /// are stored as they are.
  template <typename Derived>
  void add(const std::string& name, const Eigen::MatrixBase<Derived>& m, DType dtype) {
    Entry e = start(name, dtype,
                    {static_cast<std::int64_t>(m.rows()), static_cast<std::int64_t>(m.cols())});
    e.bytes.reserve(static_cast<std::size_t>(m.size()) * dtype_size(dtype));
    for (Eigen::Index i = 0; i < m.rows(); ++i)  // row-major, as PyTorch stores it
      for (Eigen::Index j = 0; j < m.cols(); ++j)
        if (!detail::append_value(e.bytes, dtype, m(i, j)))
          detail::throw_overflow(name, "[" + std::to_string(i) + ", " + std::to_string(j) + "]",
                                 static_cast<double>(m(i, j)), dtype);
    tensors_.emplace(name, std::move(e));
  }

  /// Adds a 1-D tensor of shape [n] (v is a row or column vector).
  template <typename Derived>
  void add_vector(const std::string& name, const Eigen::MatrixBase<Derived>& v, DType dtype) {
    if (v.rows() != 1 && v.cols() != 1)
      throw std::invalid_argument("safetensors writer: \"" + name + "\" must be a vector, got " +
                                  std::to_string(v.rows()) + " x " + std::to_string(v.cols()));
    Entry e = start(name, dtype, {static_cast<std::int64_t>(v.size())});
    for (Eigen::Index i = 0; i < v.size(); ++i)
      if (!detail::append_value(e.bytes, dtype, v(i)))
        detail::throw_overflow(name, "[" + std::to_string(i) + "]", static_cast<double>(v(i)),
                               dtype);
    tensors_.emplace(name, std::move(e));
  }

  /// A "__metadata__" string (PEFT writes {"format": "pt"}).
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

  /// Whether a tensor named `name` was added.
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  /// The number of tensors added.
  std::size_t size() const { return tensors_.size(); }

  /// The whole file as bytes.
  std::vector<std::uint8_t> serialize() const;

  /// Writes the file atomically (see write_file_atomically): on failure, throws WriteError and
  /// leaves any previous file at `path` unchanged.
  void save(const std::string& path) const;

 private:
  struct Entry {
    DType dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::uint8_t> bytes;
  };

  Entry start(const std::string& name, DType dtype, std::vector<std::int64_t> shape) const;

  std::map<std::string, Entry> tensors_;
  std::map<std::string, std::string> metadata_;
};

#if LORA_WITH_BODIES

LORA_FUNC std::vector<std::uint8_t> SafeTensorsWriter::serialize() const {
  const std::uint16_t one = 1;
  std::uint8_t first_byte;
  std::memcpy(&first_byte, &one, 1);
  if (first_byte != 1)
    throw std::runtime_error("safetensors writer: big-endian hosts are not supported");
  std::vector<std::pair<const std::string*, const Entry*>> order;
  for (const auto& [name, e] : tensors_) order.emplace_back(&name, &e);
  std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
    const int ra = detail::dtype_sort_rank(a.second->dtype);
    const int rb = detail::dtype_sort_rank(b.second->dtype);
    if (ra != rb) return ra > rb;
    return *a.first < *b.first;
  });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  std::size_t offset = 0;
  for (const auto& [name, e] : order) {
    nlohmann::ordered_json entry = nlohmann::ordered_json::object();
    entry["dtype"] = dtype_name(e->dtype);
    entry["shape"] = e->shape;
    entry["data_offsets"] = {offset, offset + e->bytes.size()};
    header[*name] = std::move(entry);
    offset += e->bytes.size();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-byte aligned

  std::vector<std::uint8_t> out;
  out.reserve(8 + text.size() + offset);
  const std::uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::uint8_t>(n >> (8 * i)));
  out.insert(out.end(), text.begin(), text.end());
  for (const auto& [name, e] : order) out.insert(out.end(), e->bytes.begin(), e->bytes.end());
  return out;
}

LORA_FUNC void SafeTensorsWriter::save(const std::string& path) const {
  const std::vector<std::uint8_t> bytes = serialize();
  write_file_atomically(path, bytes.data(), bytes.size());
}

LORA_FUNC SafeTensorsWriter::Entry SafeTensorsWriter::start(const std::string& name, DType dtype,
                                                            std::vector<std::int64_t> shape) const {
  if (name.empty()) throw std::invalid_argument("safetensors writer: a tensor name is empty");
  if (name == "__metadata__")
    throw std::invalid_argument("safetensors writer: \"__metadata__\" is reserved");
  if (contains(name))
    throw std::invalid_argument("safetensors writer: tensor \"" + name + "\" added twice");
  if (dtype != DType::F64 && dtype != DType::F32 && dtype != DType::F16 && dtype != DType::BF16)
    throw std::invalid_argument(std::string("safetensors writer: cannot write dtype ") +
                                dtype_name(dtype) + " for \"" + name +
                                "\"; use F64, F32, F16 or BF16");
  return Entry{dtype, std::move(shape), {}};
}

#endif  // LORA_WITH_BODIES

}  // namespace lora::io
