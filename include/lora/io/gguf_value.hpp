// One GGUF metadata value (the `value` of a key-value pair): a scalar of one of GGUF's twelve
// types, or an array of one of them (GGUF allows arrays of arrays; llama.cpp's loader refuses
// them, and so does lora). Used by both the GGUF reader (lora/io/gguf.hpp) and the writer
// (lora/io/gguf_writer.hpp), so that the types written are exactly the types llama.cpp reads: a
// value of the wrong type (`adapter.lora.alpha` as u32 instead of f32) makes llama.cpp abort.
#pragma once

#include "lora/io/format_error.hpp"

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora::io {

namespace detail {
/// `s` in double quotes for an error message, cut to its first 200 bytes (with its length) when
/// longer: a hostile key may be a gigabyte long.
inline std::string gguf_quote(const std::string& s) {
  if (s.size() <= 200) return "\"" + s + "\"";
  return "\"" + s.substr(0, 200) + "...\" (" + std::to_string(s.size()) + " bytes)";
}
}  // namespace detail

/// GGUF's value types (gguf.h's enum gguf_type; the numbers are the file format's).
enum class GgufType : std::uint32_t {
  U8 = 0,
  I8 = 1,
  U16 = 2,
  I16 = 3,
  U32 = 4,
  I32 = 5,
  F32 = 6,
  Bool = 7,
  String = 8,
  Array = 9,
  U64 = 10,
  I64 = 11,
  F64 = 12,
};

/// GGUF's name of a value type, as gguf_type_name prints it ("u32", "f32", "str", "arr"), or
/// "unknown".
inline const char* gguf_type_name(GgufType t) {
  switch (t) {
    case GgufType::U8:
      return "u8";
    case GgufType::I8:
      return "i8";
    case GgufType::U16:
      return "u16";
    case GgufType::I16:
      return "i16";
    case GgufType::U32:
      return "u32";
    case GgufType::I32:
      return "i32";
    case GgufType::F32:
      return "f32";
    case GgufType::Bool:
      return "bool";
    case GgufType::String:
      return "str";
    case GgufType::Array:
      return "arr";
    case GgufType::U64:
      return "u64";
    case GgufType::I64:
      return "i64";
    case GgufType::F64:
      return "f64";
  }
  return "unknown";
}

/// The bytes of one element of a fixed-size type (0 for String and Array, which have none).
inline std::size_t gguf_type_size(GgufType t) {
  switch (t) {
    case GgufType::U8:
    case GgufType::I8:
    case GgufType::Bool:
      return 1;
    case GgufType::U16:
    case GgufType::I16:
      return 2;
    case GgufType::U32:
    case GgufType::I32:
    case GgufType::F32:
      return 4;
    case GgufType::U64:
    case GgufType::I64:
    case GgufType::F64:
      return 8;
    case GgufType::String:
    case GgufType::Array:
      return 0;
  }
  return 0;
}

/// The GGUF type of a C++ type: std::uint8_t is U8, float is F32, bool is Bool, std::string is
/// String, and so on (no other type has one).
template <typename T>
constexpr GgufType gguf_type_of() {
  if constexpr (std::is_same_v<T, std::uint8_t>)
    return GgufType::U8;
  else if constexpr (std::is_same_v<T, std::int8_t>)
    return GgufType::I8;
  else if constexpr (std::is_same_v<T, std::uint16_t>)
    return GgufType::U16;
  else if constexpr (std::is_same_v<T, std::int16_t>)
    return GgufType::I16;
  else if constexpr (std::is_same_v<T, std::uint32_t>)
    return GgufType::U32;
  else if constexpr (std::is_same_v<T, std::int32_t>)
    return GgufType::I32;
  else if constexpr (std::is_same_v<T, float>)
    return GgufType::F32;
  else if constexpr (std::is_same_v<T, bool>)
    return GgufType::Bool;
  else if constexpr (std::is_same_v<T, std::string>)
    return GgufType::String;
  else if constexpr (std::is_same_v<T, std::uint64_t>)
    return GgufType::U64;
  else if constexpr (std::is_same_v<T, std::int64_t>)
    return GgufType::I64;
  else if constexpr (std::is_same_v<T, double>)
    return GgufType::F64;
  else
    static_assert(!sizeof(T), "GGUF has no value type for this C++ type");
}

/// A metadata value: a scalar, or an array of scalars of one type. Numbers are kept as their
/// little-endian bytes, strings as std::string (any bytes; GGUF says UTF-8 but checks nothing).
///
///   GgufValue::of(1e-5f)                          // f32
///   GgufValue::of(std::string("llama"))           // str
///   GgufValue::array(std::vector<float>{...})     // arr[f32]
///   v.get<float>()                                // the f32, or FormatError for any other type
class GgufValue {
 public:
  /// An empty u8 array (a placeholder; every value read or written is built by of/array).
  GgufValue() = default;

  /// A scalar of the GGUF type of T (see gguf_type_of).
  template <typename T>
  static GgufValue of(const T& v) {
    GgufValue out;
    out.type_ = gguf_type_of<T>();
    out.element_type_ = out.type_;
    out.count_ = 1;
    out.append(v);
    return out;
  }
  /// A str scalar from a C string.
  static GgufValue of(const char* s) { return of(std::string(s)); }

  /// An array of the GGUF type of T.
  template <typename T>
  static GgufValue array(const std::vector<T>& values) {
    GgufValue out;
    out.type_ = GgufType::Array;
    out.element_type_ = gguf_type_of<T>();
    out.count_ = values.size();
    for (const auto& v : values) out.append(v);
    return out;
  }

  /// GgufType::Array for an array, otherwise the scalar's type.
  GgufType type() const { return type_; }
  /// The type of the elements of an array; the scalar's type for a scalar.
  GgufType element_type() const { return element_type_; }
  /// Whether this is an array.
  bool is_array() const { return type_ == GgufType::Array; }
  /// The number of elements (1 for a scalar).
  std::uint64_t size() const { return count_; }
  /// The type as llama.cpp prints it: "f32", "str", "arr[str]".
  std::string type_string() const {
    if (!is_array()) return gguf_type_name(type_);
    return std::string("arr[") + gguf_type_name(element_type_) + "]";
  }

  /// The scalar, when this is a scalar of exactly T's GGUF type (a u32 is not an i32 nor an f32,
  /// as for llama.cpp); otherwise throws FormatError saying which type it is.
  template <typename T>
  T get() const {
    require(false, gguf_type_of<T>());
    return element<T>(0);
  }

  /// Every element of an array of exactly T's GGUF type; otherwise throws FormatError.
  template <typename T>
  std::vector<T> get_array() const {
    require(true, gguf_type_of<T>());
    std::vector<T> out;
    out.reserve(static_cast<std::size_t>(count_));
    for (std::uint64_t i = 0; i < count_; ++i) out.push_back(element<T>(i));
    return out;
  }

  /// The value as short text for messages and listings: numbers and strings as they are
  /// (strings quoted, cut at 60 characters), arrays as their type and length.
  std::string to_string() const {
    if (is_array()) return type_string() + " of " + std::to_string(count_) + " elements";
    switch (type_) {
      case GgufType::String: {
        const std::string& s = strings_[0];
        return "\"" + (s.size() > 60 ? s.substr(0, 57) + "..." : s) + "\"";
      }
      case GgufType::Bool:
        return element<bool>(0) ? "true" : "false";
      case GgufType::F32:
        return std::to_string(element<float>(0));
      case GgufType::F64:
        return std::to_string(element<double>(0));
      case GgufType::U8:
        return std::to_string(element<std::uint8_t>(0));
      case GgufType::I8:
        return std::to_string(element<std::int8_t>(0));
      case GgufType::U16:
        return std::to_string(element<std::uint16_t>(0));
      case GgufType::I16:
        return std::to_string(element<std::int16_t>(0));
      case GgufType::U32:
        return std::to_string(element<std::uint32_t>(0));
      case GgufType::I32:
        return std::to_string(element<std::int32_t>(0));
      case GgufType::U64:
        return std::to_string(element<std::uint64_t>(0));
      case GgufType::I64:
        return std::to_string(element<std::int64_t>(0));
      case GgufType::Array:
        break;
    }
    return "?";
  }

  /// Two values are equal when their types and elements are (bitwise for floats).
  bool operator==(const GgufValue& o) const {
    return type_ == o.type_ && element_type_ == o.element_type_ && count_ == o.count_ &&
           bytes_ == o.bytes_ && strings_ == o.strings_;
  }
  /// Not ==.
  bool operator!=(const GgufValue& o) const { return !(*this == o); }

  /// The little-endian bytes of the numeric elements (empty for strings).
  const std::vector<std::uint8_t>& raw_bytes() const { return bytes_; }
  /// The strings of a str scalar or a str array (empty otherwise).
  const std::vector<std::string>& strings() const { return strings_; }

  /// Builds a value from parts the reader has already checked (`bytes`: count elements of a
  /// fixed-size `element` type, or `strings` for String). For the reader; prefer of / array.
  static GgufValue from_parts(bool array, GgufType element, std::uint64_t count,
                              std::vector<std::uint8_t> bytes, std::vector<std::string> strings) {
    GgufValue out;
    out.type_ = array ? GgufType::Array : element;
    out.element_type_ = element;
    out.count_ = count;
    out.bytes_ = std::move(bytes);
    out.strings_ = std::move(strings);
    return out;
  }

 private:
  template <typename T>
  void append(const T& v) {
    if constexpr (std::is_same_v<T, std::string>) {
      strings_.push_back(v);
    } else if constexpr (std::is_same_v<T, bool>) {
      bytes_.push_back(v ? 1 : 0);
    } else {
      const auto* b = reinterpret_cast<const std::uint8_t*>(&v);
      bytes_.insert(bytes_.end(), b, b + sizeof(T));
    }
  }

  template <typename T>
  T element(std::uint64_t i) const {
    if constexpr (std::is_same_v<T, std::string>) {
      return strings_[static_cast<std::size_t>(i)];
    } else if constexpr (std::is_same_v<T, bool>) {
      return bytes_[static_cast<std::size_t>(i)] != 0;  // as llama.cpp: any non-zero byte
    } else {
      T v;
      std::memcpy(&v, bytes_.data() + static_cast<std::size_t>(i) * sizeof(T), sizeof(T));
      return v;
    }
  }

  void require(bool array, GgufType want) const {
    if (is_array() != array || element_type_ != want) {
      const std::string wanted =
          array ? std::string("arr[") + gguf_type_name(want) + "]" : gguf_type_name(want);
      throw FormatError("GGUF value is " + type_string() + ", expected " + wanted);
    }
  }

  GgufType type_ = GgufType::Array;
  GgufType element_type_ = GgufType::U8;
  std::uint64_t count_ = 0;
  std::vector<std::uint8_t> bytes_;
  std::vector<std::string> strings_;
};

}  // namespace lora::io
