// A merged model as one GGUF file: the base model with each adapted weight replaced by the
// layer's merged weight W0 + s B A (DoRA: m / ||W0 + s B A||_row (W0 + s B A)), encoded in the
// type the user picks. llama.cpp then serves the fine-tuned model as a plain model, with no
// adapter to load and no added latency.
//
//   const auto base = lora::io::GgufFile::load("model-Q4_K_M.gguf");
//   auto layers = lora::gguf::make_layers<float, lora::GgmlFrozenWeight>("adapter.gguf", base);
//   // ... train ...
//   lora::gguf::MergedModelOptions o;
//   o.type = lora::io::GgmlType::Q8_0;  // or leave empty: each weight keeps its base type
//   lora::gguf::write_merged_model("model-merged-Q8_0.gguf", base, layers, o);
//
// Every other tensor and every metadata key is copied from the base as stored. A quantized merged
// weight is quantized once more, from W0's dequantized values plus the update: its error is the
// type's, on the merged weight (an F16 or F32 merged weight keeps the base's quantization and
// adds only the update's rounding).
#pragma once

#include "lora/gguf/adapter_io.hpp"
#include "lora/io/ggml_types.hpp"
#include "lora/io/gguf.hpp"
#include "lora/io/gguf_writer.hpp"
#include "lora/lora_linear.hpp"

#include <map>
#include <optional>
#include <stdexcept>
#include <string>

namespace lora::gguf {

/// How write_merged_model encodes the merged weights.
struct MergedModelOptions {
  /// The type of every merged weight: F32, F16, BF16, Q8_0, Q4_0 (rows a whole number of 32
  /// values), Q4_K, Q6_K (of 256). Empty: each merged weight takes its base tensor's type (a
  /// Q4_K_M file stays Q4_K_M), which must then be one of those.
  std::optional<io::GgmlType> type;
};

/// A writer holding `base` (metadata and tensors as stored) with the weight of each layer of
/// `layers` (GGUF tensor name -> layer, any storage) replaced by the layer's merged weight, as
/// the layer serves it when merged. The layers are not changed (a merged layer gives its weight
/// as it is). Throws std::invalid_argument naming the layer when the base has no such 2-D
/// tensor, when its shape is not the layer's (ne = [in, out]), when the layer has a lora bias
/// (a llama.cpp weight has no place for it) or when the type cannot be written, and
/// std::domain_error when a merged value does not fit the type.
template <typename T, typename Frozen>
io::GgufWriter merged_model_writer(const io::GgufFile& base,
                                   const std::map<std::string, LoRALinear<T, Frozen>>& layers,
                                   const MergedModelOptions& options = {}) {
  io::GgufWriter writer = io::GgufWriter::copy_of(base);
  for (const auto& entry : layers) {
    const std::string& name = entry.first;
    const LoRALinear<T, Frozen>& layer = entry.second;
    auto fail = [&](const std::string& why) {
      return std::invalid_argument("GGUF write_merged_model: layer " + detail::quoted(name) + " " +
                                   why);
    };
    if (!base.contains(name)) throw fail("has no tensor of that name in \"" + base.source() + "\"");
    const io::GgufTensorInfo& t = base.info(name);
    if (t.ne.size() != 2 || t.ne[0] != layer.in_features() || t.ne[1] != layer.out_features())
      throw fail("is " + lora::detail::shape_string(layer.out_features(), layer.in_features()) +
                 " (out x in), but the base tensor has ne = " + t.shape_string() +
                 " (expected [in, out])");
    if (layer.adapter().has_lora_bias())
      throw fail(
          "has a lora bias, which a llama.cpp weight cannot hold: merge it into the "
          "model's bias tensor yourself, or train without lora_bias");
    const io::GgmlType type = options.type.value_or(t.type);
    if (!io::ggml::can_quantize(type))
      throw fail(std::string("would be written as ") + io::ggml_type_traits(type).name +
                 ", which lora does not write: pick f32, f16, bf16, q8_0, q4_0, q4_K or q6_K "
                 "in MergedModelOptions::type");
    if (layer.is_merged()) {
      writer.replace_matrix(name, layer.weight(), type);
    } else {
      // The layer merged as it would serve itself (a copy: the caller's layer stays unmerged).
      LoRALinear<T, Frozen> merged = layer;
      merged.merge();
      writer.replace_matrix(name, merged.weight(), type);
    }
  }
  return writer;
}

/// Writes merged_model_writer(base, layers, options) to `path` atomically (a failure leaves any
/// file at `path` as it was). Throws as merged_model_writer, and io::WriteError.
template <typename T, typename Frozen>
void write_merged_model(const std::string& path, const io::GgufFile& base,
                        const std::map<std::string, LoRALinear<T, Frozen>>& layers,
                        const MergedModelOptions& options = {}) {
  merged_model_writer(base, layers, options).save(path);
}

}  // namespace lora::gguf
