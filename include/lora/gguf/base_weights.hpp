// Base weights from a GGUF model (llama.cpp's files) into lora's frozen storages, under the
// architecture's own tensor names ("blk.0.attn_q.weight", "output.weight", ...). GGUF stores a
// linear weight with ne = [in, out] (ne[0] fastest), which is PyTorch's (out, in) row-major
// layout: the matrices here are out x in, as every lora layer takes W0.
//
//   const auto model = lora::io::GgufFile::load("model.gguf");
//   lora::LoRALinear<float> q(lora::gguf::read_matrix<float>(model, "blk.0.attn_q.weight"), cfg);
//   lora::LoRALinear<float, lora::Bf16FrozenWeight> v(
//       lora::gguf::read_bf16_weight(model, "blk.0.attn_v.weight"), {}, cfg);
//
// Tensor types F32, F16, BF16, F64 and the block types Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K
// convert (dequantized bit for bit as ggml does); other types are refused with a FormatError
// saying so (their raw blocks: GgufFile::data / raw). read_ggml_weight keeps a tensor's blocks as
// stored instead (QLoRA on the file's own quantization: docs/gguf_quantized.md):
//
//   lora::LoRALinear<float, lora::GgmlFrozenWeight> q(
//       lora::gguf::read_ggml_weight(model, "blk.0.attn_q.weight"), {}, cfg);
#pragma once

#include "lora/bf16_frozen_weight.hpp"
#include "lora/dense_frozen_weight.hpp"
#include "lora/frozen_storage.hpp"
#include "lora/ggml_frozen_weight.hpp"
#include "lora/io/gguf.hpp"

#include <Eigen/Core>

#include <map>
#include <string>
#include <type_traits>
#include <vector>

namespace lora::gguf {

/// The 2-D tensor `name` of `file` as a T matrix, out x in (rows = ne[1], cols = ne[0]). Throws
/// io::FormatError when the file has no such tensor, when it is not 2-D, when its type cannot
/// be converted, or when it holds a value that is not finite (a NaN or infinite value, or a
/// block's non-finite fp16 scale: a corrupt weight, refused as GgmlFrozenWeight refuses it).
template <typename T>
Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> read_matrix(const io::GgufFile& file,
                                                             const std::string& name) {
  const io::GgufTensorInfo& t = file.info(name);
  if (t.ne.size() != 2)
    throw io::FormatError("GGUF: \"" + file.source() + "\": tensor " +
                          io::detail::gguf_quote(name) +
                          " is not a 2-D weight: " + t.shape_string());
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> m = file.matrix<T>(name);
  if (!m.allFinite()) {
    Eigen::Index row = 0, col = 0;
    (!m.array().isFinite()).template cast<int>().maxCoeff(&row, &col);
    throw io::FormatError("GGUF: \"" + file.source() + "\": tensor " +
                          io::detail::gguf_quote(name) + " (" + io::ggml_type_traits(t.type).name +
                          ") holds " + std::to_string(static_cast<double>(m(row, col))) +
                          " at row " + std::to_string(row) + ", column " + std::to_string(col) +
                          ": a base weight must be finite");
  }
  return m;
}

/// The 1-D tensor `name` (a norm's weight, a bias) as a T vector; throws io::FormatError as
/// read_matrix.
template <typename T>
Eigen::Matrix<T, Eigen::Dynamic, 1> read_vector(const io::GgufFile& file, const std::string& name) {
  const io::GgufTensorInfo& t = file.info(name);
  if (t.ne.size() != 1)
    throw io::FormatError("GGUF: \"" + file.source() + "\": tensor " +
                          io::detail::gguf_quote(name) + " is not 1-D: " + t.shape_string());
  const std::vector<T> v = file.values<T>(name);
  return Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>>(v.data(), t.ne[0]);
}

/// The weight `name` as a dense frozen storage of T (see DenseFrozenWeight for `mode`).
template <typename T>
DenseFrozenWeight<T> read_dense_weight(const io::GgufFile& file, const std::string& name,
                                       MergeMode mode = MergeMode::InPlace) {
  return DenseFrozenWeight<T>(read_matrix<T>(file, name), mode);
}

/// The weight `name` as a bf16 frozen storage. A BF16 tensor is stored bit for bit as the file
/// holds it; F32, F16 and Q8_0 tensors are rounded to bf16 (see Bf16FrozenWeight).
inline Bf16FrozenWeight read_bf16_weight(const io::GgufFile& file, const std::string& name,
                                         MergeMode mode = MergeMode::ExactRestore,
                                         Bf16Backend backend = Bf16Backend::Auto) {
  return Bf16FrozenWeight(read_matrix<float>(file, name), mode, backend);
}

/// The 2-D weight `name` as stored in the file (any type lora dequantizes: the blocks of a Q4_K,
/// Q6_K, Q8_0, ... tensor are kept as they are, no full-precision copy), as a GgmlFrozenWeight
/// (see it for `mode` and `backend`). Throws io::FormatError when the file has no such tensor,
/// when it is not 2-D, and as GgmlFrozenWeight's constructor (a non-finite scale, a type lora
/// cannot dequantize).
inline GgmlFrozenWeight read_ggml_weight(const io::GgufFile& file, const std::string& name,
                                         MergeMode mode = MergeMode::ExactRestore,
                                         GgmlBackend backend = GgmlBackend::Auto) {
  const io::GgufTensorInfo& t = file.info(name);
  if (t.ne.size() != 2)
    throw io::FormatError("GGUF: \"" + file.source() + "\": tensor " +
                          io::detail::gguf_quote(name) +
                          " is not a 2-D weight: " + t.shape_string());
  return GgmlFrozenWeight(file.data(name), t.bytes, t.type, t.ne[0], t.ne[1], name, mode, backend);
}

namespace detail {

/// The frozen storage `Frozen` of weight `name`, built as `Frozen(W0, args...)` from the
/// dequantized matrix; a GgmlFrozenWeight keeps the tensor's blocks as stored instead.
template <typename T, typename Frozen, typename... StorageArgs>
Frozen read_storage(const io::GgufFile& file, const std::string& name,
                    const StorageArgs&... storage_args) {
  if constexpr (std::is_same_v<Frozen, GgmlFrozenWeight>)
    return read_ggml_weight(file, name, storage_args...);
  else
    return Frozen(read_matrix<T>(file, name), storage_args...);
}

}  // namespace detail

/// The weights `names` of `file` by name (out x in each): the base weights that
/// make_layers and the adapter readers take. Throws io::FormatError as read_matrix.
template <typename T>
std::map<std::string, Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>> read_weights(
    const io::GgufFile& file, const std::vector<std::string>& names) {
  std::map<std::string, Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>> out;
  for (const auto& name : names) out.emplace(name, read_matrix<T>(file, name));
  return out;
}

}  // namespace lora::gguf
