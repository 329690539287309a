// Reading safetensors files (https://github.com/huggingface/safetensors): an 8-byte little-endian
// header length N, N bytes of JSON describing each tensor (dtype, shape, [begin, end) offsets into
// the data that follows), then the data, row-major like PyTorch. Every number in the header is
// checked against the file before any byte of data is touched, so a truncated or corrupt file is
// a lora::io::FormatError that says what was wrong, never an out-of-bounds read.
#pragma once

#include "lora/detail/compiled_mode.hpp"
#include "lora/io/dtype.hpp"
#include "lora/io/format_error.hpp"
#include "lora/io/read_file.hpp"

#include <Eigen/Core>
// The declarations name nlohmann::json only; the bodies that parse need the whole library.
#if LORA_WITH_BODIES || !__has_include(<nlohmann/json_fwd.hpp>)
#include <nlohmann/json.hpp>
#else
#include <nlohmann/json_fwd.hpp>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace lora::io {

/// `s` in double quotes for an error message; a name or pattern longer than 200 characters is cut
/// to its first 200, followed by its length (a hostile name may be megabytes long).
LORA_FUNC std::string quote_for_message(const std::string& s, std::size_t keep = 200);

LORA_FUNC std::string shape_to_string(const std::vector<std::int64_t>& shape);

/// One tensor's entry in the header. begin/end index the data section (after the header).
struct TensorInfo {
  DType dtype = DType::F32;         ///< element type
  std::vector<std::int64_t> shape;  ///< dimensions, outermost first (row-major, as in the file)
  std::size_t begin = 0;            ///< first byte of the data, from the data section's start
  std::size_t end = 0;              ///< one past the last byte

  /// The element count. A shape with a zero dimension has none, however large the others are
  /// (e.g. [2^62, 3, 0]); otherwise a count that does not fit in int64 throws FormatError.
  std::int64_t numel() const;
};

/// The largest header the reference implementation accepts (100 MB): a longer one is an attack or
/// a corrupt length, not a real file.
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;
/// The deepest nesting a header may have. Real headers nest 3 levels ({name: {shape: [...]}}).
inline constexpr int kMaxHeaderDepth = 64;

/// A safetensors file held in memory.
class SafeTensors {
 public:
  /// Reads and validates the file at `path`.
  static SafeTensors load(const std::string& path);

  /// Validates `bytes` as a safetensors file; `source` names it in error messages.
  static SafeTensors parse(std::vector<std::uint8_t> bytes, const std::string& source = "<memory>");

  /// Tensor names, sorted.
  std::vector<std::string> names() const;

  /// Whether the file holds a tensor named `name`.
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  /// The number of tensors.
  std::size_t size() const { return tensors_.size(); }

  /// The header entry of tensor `name`; throws FormatError when there is none.
  const TensorInfo& info(const std::string& name) const;

  /// The free-form "__metadata__" strings (empty if the file has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// Every element of tensor `name`, in the file's row-major order, converted to T
  /// (F64, F32, F16 and BF16 convert; other dtypes throw).
  template <typename T>
  std::vector<T> values(const std::string& name) const {
    const TensorInfo& t = info(name);
    const std::uint8_t* p = data() + t.begin;
    const auto n = static_cast<std::size_t>(t.numel());
    std::vector<T> out(n);
    switch (t.dtype) {
      case DType::F64:
        convert<double>(p, out, [](double v) { return v; });
        break;
      case DType::F32:
        convert<float>(p, out, [](float v) { return v; });
        break;
      case DType::F16:
        convert<std::uint16_t>(p, out, f16_to_float);
        break;
      case DType::BF16:
        convert<std::uint16_t>(p, out, bf16_to_float);
        break;
      default:
        throw FormatError("safetensors: tensor \"" + name + "\" has dtype " + dtype_name(t.dtype) +
                          "; only F64, F32, F16 and BF16 convert to floats");
    }
    return out;
  }

  /// A 2-D tensor as an Eigen matrix of the same rows x cols (the file's row-major layout becomes
  /// Eigen's column-major one; the logical shape is unchanged).
  template <typename T>
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> matrix(const std::string& name) const {
    const TensorInfo& t = info(name);
    if (t.shape.size() != 2)
      throw FormatError("safetensors: tensor \"" + name + "\" must be 2-D, got shape " +
                        shape_to_string(t.shape));
    const std::vector<T> v = values<T>(name);
    using RowMajor = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    return Eigen::Map<const RowMajor>(v.data(), t.shape[0], t.shape[1]);
  }

  /// A 1-D tensor as an Eigen vector.
  template <typename T>
  Eigen::Matrix<T, Eigen::Dynamic, 1> vector(const std::string& name) const {
    const TensorInfo& t = info(name);
    if (t.shape.size() != 1)
      throw FormatError("safetensors: tensor \"" + name + "\" must be 1-D, got shape " +
                        shape_to_string(t.shape));
    const std::vector<T> v = values<T>(name);
    return Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>>(v.data(), t.shape[0]);
  }

 private:
  const std::uint8_t* data() const { return bytes_.data() + data_start_; }

  template <typename Stored, typename T, typename Convert>
  static void convert(const std::uint8_t* p, std::vector<T>& out, Convert to_value) {
    for (std::size_t i = 0; i < out.size(); ++i) {
      Stored v;
      std::memcpy(&v, p + i * sizeof(Stored), sizeof(Stored));  // data may be unaligned
      out[i] = static_cast<T>(to_value(v));
    }
  }

  [[noreturn]] void fail(const std::string& what) const;

  static bool is_little_endian();

  void parse_header();

  static std::string quoted(const std::string& s) { return quote_for_message(s); }

  /// A JSON value from the file, for an error message: its text when short and flat, otherwise
  /// only its type and size. json::dump() recurses once per nesting level, so dumping a hostile
  /// `[[[[...` header would overflow the stack, and a huge value would make a huge message.
  static std::string brief(const nlohmann::json& v);

  TensorInfo parse_entry(const std::string& name, const nlohmann::json& v,
                         std::size_t data_size) const;

  std::string source_;
  std::vector<std::uint8_t> bytes_;
  std::size_t data_start_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

#if LORA_WITH_BODIES

LORA_FUNC std::string quote_for_message(const std::string& s, std::size_t keep) {
  if (s.size() <= keep) return "\"" + s + "\"";
  return "\"" + s.substr(0, keep) + "...\" (" + std::to_string(s.size()) + " characters)";
}

LORA_FUNC std::string shape_to_string(const std::vector<std::int64_t>& shape) {
  std::ostringstream s;
  s << '[';
  for (std::size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << ']';
  return s.str();
}

LORA_FUNC std::int64_t TensorInfo::numel() const {
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return 0;
  std::int64_t n = 1;
  for (auto s : shape) {
    if (s < 0 || n > std::numeric_limits<std::int64_t>::max() / s)
      throw FormatError("safetensors: shape " + shape_to_string(shape) + " overflows");
    n *= s;
  }
  return n;
}

LORA_FUNC SafeTensors SafeTensors::load(const std::string& path) {
  return parse(read_file(path, "safetensors"), path);
}

LORA_FUNC SafeTensors SafeTensors::parse(std::vector<std::uint8_t> bytes,
                                         const std::string& source) {
  SafeTensors st;
  st.source_ = source;
  st.bytes_ = std::move(bytes);
  st.parse_header();
  return st;
}

LORA_FUNC std::vector<std::string> SafeTensors::names() const {
  std::vector<std::string> out;
  for (const auto& [name, info] : tensors_) out.push_back(name);
  return out;
}

LORA_FUNC const TensorInfo& SafeTensors::info(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end())
    throw FormatError("safetensors: \"" + source_ + "\" has no tensor " + quoted(name));
  return it->second;
}

LORA_FUNC void SafeTensors::fail(const std::string& what) const {
  throw FormatError("safetensors: \"" + source_ + "\": " + what);
}

LORA_FUNC bool SafeTensors::is_little_endian() {
  const std::uint16_t one = 1;
  std::uint8_t first;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

LORA_FUNC void SafeTensors::parse_header() {
  static_assert(sizeof(std::size_t) >= 8, "lora::io needs a 64-bit size_t");
  if (!is_little_endian()) fail("big-endian hosts are not supported");
  if (bytes_.size() < 8)
    fail("file is " + std::to_string(bytes_.size()) +
         " bytes, shorter than the 8-byte header length");
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes_[static_cast<std::size_t>(i)];
  if (n > kMaxHeaderBytes) fail("header length " + std::to_string(n) + " exceeds the 100 MB limit");
  if (n > bytes_.size() - 8)
    fail("header length " + std::to_string(n) + " runs past the end of the file (" +
         std::to_string(bytes_.size() - 8) + " bytes follow the length)");
  data_start_ = 8 + static_cast<std::size_t>(n);
  const std::size_t data_size = bytes_.size() - data_start_;

  // JSON has no raw NUL byte, and nlohmann's parser would stop at one and ignore the rest.
  const auto nul = std::find(bytes_.begin() + 8, bytes_.begin() + static_cast<long>(data_start_),
                             std::uint8_t{0});
  if (nul != bytes_.begin() + static_cast<long>(data_start_))
    fail("header has a NUL byte at offset " + std::to_string(nul - bytes_.begin()) +
         " (pad a header with spaces)");

  nlohmann::json header;
  try {
    // Refused while parsing (the parser is iterative; json::dump() and deep copies are not): a
    // nesting deeper than kMaxHeaderDepth, and a key twice in one object (the parser would keep
    // the last silently; the reference implementation refuses it).
    std::vector<std::set<std::string>> keys;  // one per open object
    header = nlohmann::json::parse(
        bytes_.begin() + 8, bytes_.begin() + static_cast<long>(data_start_),
        [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
          using Event = nlohmann::json::parse_event_t;
          // An object or array opened below `depth` enclosing ones is at level depth + 1.
          if ((event == Event::object_start || event == Event::array_start) &&
              depth >= kMaxHeaderDepth)
            fail("header nests deeper than " + std::to_string(kMaxHeaderDepth) + " levels");
          if (event == Event::object_start) {
            keys.emplace_back();
          } else if (event == Event::object_end) {
            keys.pop_back();
          } else if (event == Event::key && !keys.empty()) {
            const auto& key = parsed.get_ref<const std::string&>();
            if (!keys.back().insert(key).second)
              fail("header has the key " + quoted(key) + " twice in one object");
          }
          return true;
        });
  } catch (const nlohmann::json::exception& e) {
    fail(std::string("header is not valid JSON: ") + e.what());
  }
  if (!header.is_object()) fail("header must be a JSON object");

  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      if (!value.is_object()) fail("__metadata__ must be an object of strings");
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string()) fail("__metadata__ value of " + quoted(mk) + " must be a string");
        metadata_[mk] = mv.get<std::string>();
      }
      continue;
    }
    tensors_[key] = parse_entry(key, value, data_size);
  }

  // The format indexes the whole data section, without holes or shared bytes ("this prevents
  // the creation of polyglot files"); the reference implementation refuses both, and so does
  // this reader: bytes that no tensor claims would be data that no check looks at.
  std::vector<std::pair<const std::string*, const TensorInfo*>> spans;
  for (const auto& [name, info] : tensors_) spans.emplace_back(&name, &info);
  std::sort(spans.begin(), spans.end(), [](const auto& a, const auto& b) {
    return std::make_pair(a.second->begin, a.second->end) <
           std::make_pair(b.second->begin, b.second->end);
  });
  for (std::size_t i = 1; i < spans.size(); ++i)
    if (spans[i].second->begin < spans[i - 1].second->end)
      fail("tensors " + quoted(*spans[i - 1].first) + " and " + quoted(*spans[i].first) +
           " overlap in the data section");
  std::size_t expected = 0;
  for (const auto& [name, info] : spans) {
    if (info->begin > expected)
      fail("bytes " + std::to_string(expected) + " to " + std::to_string(info->begin) +
           " of the data section belong to no tensor (the format allows no holes)");
    expected = info->end;
  }
  if (expected != data_size)
    fail(std::to_string(data_size - expected) + " bytes after the last tensor belong to no " +
         "tensor (the data section is " + std::to_string(data_size) + " bytes)");
}

LORA_FUNC std::string SafeTensors::brief(const nlohmann::json& v) {
  const bool flat =
      std::none_of(v.begin(), v.end(), [](const nlohmann::json& e) { return e.is_structured(); });
  if (!v.is_structured() || (flat && v.size() <= 4)) {
    std::string text = v.dump();
    if (text.size() > 80) text = text.substr(0, 77) + "...";
    return text;
  }
  return std::string("an ") + v.type_name() + " of " + std::to_string(v.size()) + " elements";
}

LORA_FUNC TensorInfo SafeTensors::parse_entry(const std::string& name, const nlohmann::json& v,
                                              std::size_t data_size) const {
  const std::string where = "tensor " + quoted(name) + ": ";
  if (!v.is_object()) fail(where + "entry must be an object");
  for (const char* field : {"dtype", "shape", "data_offsets"})
    if (!v.contains(field)) fail(where + "missing \"" + field + "\"");
  if (!v["dtype"].is_string()) fail(where + "dtype must be a string");
  TensorInfo t;
  try {
    t.dtype = parse_dtype(v["dtype"].get<std::string>());
  } catch (const std::invalid_argument& e) {
    fail(where + e.what());
  }
  const auto& shape = v["shape"];
  if (!shape.is_array()) fail(where + "shape must be an array");
  std::uint64_t numel = 1;
  for (const auto& d : shape) {
    if (!d.is_number_unsigned()) fail(where + "shape entries must be non-negative integers");
    const auto dim = d.get<std::uint64_t>();
    if (dim > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) ||
        (dim != 0 && numel > std::numeric_limits<std::uint64_t>::max() / dim))
      fail(where + "shape " + brief(shape) + " overflows");
    numel *= dim;
    t.shape.push_back(static_cast<std::int64_t>(dim));
  }
  const auto& off = v["data_offsets"];
  if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
      !off[1].is_number_unsigned())
    fail(where + "data_offsets must be two non-negative integers, got " + brief(off));
  const auto begin = off[0].get<std::uint64_t>(), end = off[1].get<std::uint64_t>();
  if (begin > end) fail(where + "data_offsets " + brief(off) + " end before they begin");
  if (end > data_size)
    fail(where + "data_offsets " + brief(off) + " run past the data section (" +
         std::to_string(data_size) + " bytes)");
  const std::uint64_t elem = dtype_size(t.dtype);
  if (numel > std::numeric_limits<std::uint64_t>::max() / elem)
    fail(where + "shape " + shape_to_string(t.shape) + " of " + dtype_name(t.dtype) +
         " needs more than 2^64 bytes");
  if (numel * elem != end - begin)
    fail(where + "shape " + shape_to_string(t.shape) + " of " + dtype_name(t.dtype) + " needs " +
         std::to_string(numel * elem) + " bytes, data_offsets span " + std::to_string(end - begin));
  t.begin = static_cast<std::size_t>(begin);
  t.end = static_cast<std::size_t>(end);
  return t;
}

#endif  // LORA_WITH_BODIES

}  // namespace lora::io
