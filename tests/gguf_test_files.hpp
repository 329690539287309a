// Test helpers for GGUF: a byte-level builder of GGUF files (so that a test can write any field,
// also a wrong one, that lora's writer would refuse to write), one malformed file per hostile
// class, temporary paths, reading a file's bytes.
#pragma once

#include <Eigen/Core>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "lora/optim.hpp"

namespace gguf_test {

/// Trains `layer` 15 AdamW steps (learning rate `lr`) on a regression of 16 random inputs toward
/// random targets (drawn from `rng`), so that its B is far from zero: an adapter for the files.
template <typename Layer>
void train_toward_random_targets(Layer& layer, std::mt19937& rng, double lr) {
  std::normal_distribution<float> normal;
  Eigen::MatrixXf X(layer.in_features(), 16), Y(layer.out_features(), 16);
  for (Eigen::Index i = 0; i < X.size(); ++i) X.data()[i] = normal(rng);
  for (Eigen::Index i = 0; i < Y.size(); ++i) Y.data()[i] = normal(rng);
  lora::AdamWOptions opt;
  opt.lr = lr;
  lora::AdamW<float> adam(layer.parameters(), opt);
  for (int step = 0; step < 15; ++step) {
    layer.zero_grad();
    const Eigen::MatrixXf H = layer.forward(X);
    layer.backward(X, (2.0f / 16.0f) * (H - Y));
    adam.step();
  }
}

inline std::string tmp_path(const std::string& name) {
  return std::string(LORA_TEST_TMP_DIR) + "/gguf_" + name;
}

inline std::vector<std::uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<std::uint8_t>(std::istreambuf_iterator<char>(in), {});
}

/// GGUF bytes field by field, little-endian.
class Raw {
 public:
  template <typename T>
  Raw& put(T v) {
    const auto* b = reinterpret_cast<const std::uint8_t*>(&v);
    bytes_.insert(bytes_.end(), b, b + sizeof v);
    return *this;
  }
  Raw& str(const std::string& s) {
    put<std::uint64_t>(s.size());
    bytes_.insert(bytes_.end(), s.begin(), s.end());
    return *this;
  }
  Raw& header(std::int64_t n_tensors, std::int64_t n_kv, std::uint32_t version = 3) {
    bytes_.insert(bytes_.end(), {'G', 'G', 'U', 'F'});
    return put(version).put(n_tensors).put(n_kv);
  }
  Raw& kv_str(const std::string& key, const std::string& v) {
    return str(key).put<std::int32_t>(8).str(v);
  }
  Raw& kv_u32(const std::string& key, std::uint32_t v) {
    return str(key).put<std::int32_t>(4).put(v);
  }
  Raw& info(const std::string& name, std::vector<std::int64_t> ne, std::int32_t type,
            std::uint64_t offset) {
    str(name).put<std::uint32_t>(static_cast<std::uint32_t>(ne.size()));
    for (auto d : ne) put(d);
    return put(type).put(offset);
  }
  Raw& pad(std::size_t alignment = 32) {
    while (bytes_.size() % alignment) bytes_.push_back(0);
    return *this;
  }
  Raw& data(std::size_t n, std::uint8_t fill = 0) {
    bytes_.insert(bytes_.end(), n, fill);
    return *this;
  }
  std::vector<std::uint8_t> bytes() const { return bytes_; }

  /// A small valid file: two keys, an f32 matrix ne [4, 2] (32 bytes) and an f32 vector ne [8]
  /// (32 bytes) at offsets 0 and 32.
  static Raw valid() {
    Raw r;
    r.header(2, 2).kv_str("general.architecture", "llama").kv_u32("general.alignment", 32);
    r.info("w", {4, 2}, 0, 0).info("v", {8}, 0, 32).pad().data(64, 0x3f);
    return r;
  }

 private:
  std::vector<std::uint8_t> bytes_;
};

/// One malformed file per hostile class: (name, bytes, a phrase lora's message must contain).
inline std::vector<std::tuple<std::string, std::vector<std::uint8_t>, std::string>>
hostile_files() {
  std::vector<std::tuple<std::string, std::vector<std::uint8_t>, std::string>> out;
  auto add = [&](const std::string& name, const Raw& r, const std::string& needle) {
    out.emplace_back(name, r.bytes(), needle);
  };
  auto with_infos = [](auto infos) {  // header + valid kvs, then the given tensor infos
    Raw r;
    return infos(r);
  };
  {
    auto b = Raw::valid().bytes();
    b[0] = 'X';
    out.emplace_back("bad_magic", b, "magic");
  }
  add("version_1", Raw().header(0, 0, 1), "version 1");
  add("big_endian_version", Raw().header(0, 0, 0x03000000u), "byte-swapped");
  add("huge_tensor_count", Raw().header(std::int64_t{1} << 62, 0), "tensor count");
  add("huge_kv_count", Raw().header(0, std::int64_t{1} << 62), "metadata count");
  add("negative_kv_count", Raw().header(0, -1), "negative");
  add("truncated_header", Raw().put<std::uint32_t>(0x46554747u).put<std::uint32_t>(3),
      "the file ends");
  add("key_length_past_end", Raw().header(0, 1).put<std::uint64_t>(1000000).data(8, 'a'),
      "only 8 bytes follow");
  add("key_length_over_1gib",
      Raw().header(0, 1).put<std::uint64_t>(std::uint64_t{1} << 40).data(16, 'a'), "1 GiB");
  add("string_value_past_end",
      Raw().header(0, 1).str("k").put<std::int32_t>(8).put<std::uint64_t>(99).data(3, 'x'),
      "only 3 bytes follow");
  add("empty_key", Raw().header(0, 1).kv_str("", "x"), "is empty");
  add("duplicate_key", Raw().header(0, 2).kv_str("a", "x").kv_str("a", "y"), "appears twice");
  add("unknown_value_type", Raw().header(0, 1).str("k").put<std::int32_t>(13).put<std::uint32_t>(0),
      "not a GGUF value type");
  add("nested_array",
      Raw()
          .header(0, 1)
          .str("k")
          .put<std::int32_t>(9)
          .put<std::int32_t>(9)
          .put<std::uint64_t>(1)
          .put<std::int32_t>(4)
          .put<std::uint64_t>(1)
          .put<std::uint32_t>(5),
      "array of arrays");
  add("huge_array_count",
      Raw()
          .header(0, 1)
          .str("k")
          .put<std::int32_t>(9)
          .put<std::int32_t>(10)
          .put<std::uint64_t>(std::uint64_t{1} << 29)
          .data(64),
      "elements of u64");
  add("alignment_not_u32",
      Raw().header(0, 1).str("general.alignment").put<std::int32_t>(6).put<float>(32.f),
      "must be u32");
  add("alignment_not_power_of_two", Raw().header(0, 1).kv_u32("general.alignment", 48),
      "not a power of two");
  add("tensor_name_64_bytes", with_infos([](Raw& r) {
        return r.header(1, 0).info(std::string(64, 'n'), {8}, 0, 0).pad().data(32);
      }),
      "at most 63");
  add("duplicate_tensor_name", with_infos([](Raw& r) {
        return r.header(2, 0).info("w", {8}, 0, 0).info("w", {8}, 0, 32).pad().data(64);
      }),
      "appears twice");
  add("n_dims_5", with_infos([](Raw& r) {
        return r.header(1, 0).info("w", {1, 1, 1, 1, 8}, 0, 0).pad().data(32);
      }),
      "5 dimensions");
  add("negative_dimension", with_infos([](Raw& r) {
        return r.header(1, 0).info("w", {8, -1}, 0, 0).pad().data(32);
      }),
      "negative");
  add("element_count_overflows", with_infos([](Raw& r) {
        return r.header(1, 0)
            .info("w", {std::int64_t{1} << 32, (std::int64_t{1} << 31) + 1}, 0, 0)
            .pad()
            .data(32);
      }),
      "2^63");
  add("byte_size_overflows",  // 2^62 f64 elements: fits int64, not 2^64 bytes
      with_infos([](Raw& r) {
        return r.header(1, 0).info("w", {std::int64_t{1} << 62}, 28, 0).pad().data(32);
      }),
      "overflows");
  add("unknown_ggml_type",
      with_infos([](Raw& r) { return r.header(1, 0).info("w", {8}, 4, 0).pad().data(32); }),
      "does not know");
  add("partial_block",
      with_infos([](Raw& r) { return r.header(1, 0).info("w", {33}, 8, 0).pad().data(64); }),
      "multiple of its block");
  add("misaligned_offset", with_infos([](Raw& r) {
        return r.header(2, 0).info("a", {2}, 0, 0).info("b", {2}, 0, 8).pad().data(64);
      }),
      "has offset 8");
  add("overlapping_offsets", with_infos([](Raw& r) {
        return r.header(2, 0).info("a", {8}, 0, 0).info("b", {8}, 0, 0).pad().data(64);
      }),
      "has offset 0");
  add("tensor_past_the_end",
      with_infos([](Raw& r) { return r.header(1, 0).info("w", {64}, 0, 0).pad().data(100); }),
      "runs past the end");
  add("data_section_past_the_end",
      with_infos([](Raw& r) { return r.header(1, 0).info("w", {8}, 0, 0); }), "past the end");
  return out;
}

}  // namespace gguf_test
