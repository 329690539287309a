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
// Tensor types F32, F16, BF16 and Q8_0 (and F64) convert; the other block-quantized types are
// refused here with a FormatError saying so (their raw blocks: GgufFile::data / raw).
#pragma once

#include "lora/bf16_frozen_weight.hpp"
#include "lora/dense_frozen_weight.hpp"
#include "lora/frozen_storage.hpp"
#include "lora/io/gguf.hpp"

#include <Eigen/Core>

#include <map>
#include <string>
#include <vector>

namespace lora::gguf {

/// The 2-D tensor `name` of `file` as a T matrix, out x in (rows = ne[1], cols = ne[0]). Throws
/// io::FormatError when the file has no such tensor, when it is not 2-D, or when its type cannot
/// be converted yet.
template <typename T>
Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> read_matrix(const io::GgufFile& file,
                                                             const std::string& name) {
  const io::GgufTensorInfo& t = file.info(name);
  if (t.ne.size() != 2)
    throw io::FormatError("GGUF: \"" + file.source() + "\": tensor " +
                          io::detail::gguf_quote(name) +
                          " is not a 2-D weight: " + t.shape_string());
  return file.matrix<T>(name);
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
