// The llama demo's models and adapters as GGUF files, through lora's GGUF reader and writer: a
// base that llama.cpp loads as a `llama` model (with a byte-level SentencePiece vocabulary), and
// adapters in llama.cpp's LoRA format.
#pragma once

#include <lora/gguf.hpp>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "llama/byte_vocabulary.hpp"
#include "llama/llama_model.hpp"
#include "llama/text_data.hpp"

namespace llama {

/// The hyper-parameters of a GGUF llama model, from its metadata as llama.cpp reads it.
inline Config read_config(const lora::io::GgufFile& f) {
  const std::string arch = f.get<std::string>("general.architecture");
  if (arch != "llama")
    throw lora::io::FormatError("llama_finetune: \"" + f.source() + "\" is a " + arch +
                                " model; this program runs llama-family models (architecture "
                                "\"llama\")");
  Config c;
  c.n_embd = static_cast<int>(f.get<std::uint32_t>("llama.embedding_length"));
  c.n_layer = static_cast<int>(f.get<std::uint32_t>("llama.block_count"));
  c.n_ff = static_cast<int>(f.get<std::uint32_t>("llama.feed_forward_length"));
  c.n_head = static_cast<int>(f.get<std::uint32_t>("llama.attention.head_count"));
  c.n_head_kv = static_cast<int>(f.get_or<std::uint32_t>("llama.attention.head_count_kv",
                                                         static_cast<std::uint32_t>(c.n_head)));
  c.n_ctx = static_cast<int>(f.get<std::uint32_t>("llama.context_length"));
  c.rms_eps = f.get<float>("llama.attention.layer_norm_rms_epsilon");
  c.rope_base = f.get_or<float>("llama.rope.freq_base", 10000.0f);
  const auto rot = f.get_or<std::uint32_t>(
      "llama.rope.dimension_count", static_cast<std::uint32_t>(c.n_embd / std::max(1, c.n_head)));
  if (static_cast<int>(rot) != c.n_embd / std::max(1, c.n_head))
    throw lora::io::FormatError("llama_finetune: \"" + f.source() +
                                "\": partial rotary embedding (rope.dimension_count " +
                                std::to_string(rot) + ") is not supported");
  c.n_vocab = static_cast<int>(f.info("token_embd.weight").rows());
  return c;
}

/// A GGUF llama model (tensors F32, F16, BF16 or Q8_0), every weight trainable until frozen or
/// adapted.
template <typename Frozen = lora::DenseFrozenWeight<float>>
Model<float, Frozen> read_model_gguf(const std::string& path) {
  const auto f = lora::io::GgufFile::load(path);
  const Config c = read_config(f);
  Weights<float> w;
  w.token_embd = f.matrix<float>("token_embd.weight").transpose();  // n_vocab x E -> E x n_vocab
  w.output_norm =
      Eigen::Map<const Eigen::VectorXf>(f.values<float>("output_norm.weight").data(), c.n_embd);
  if (f.contains("output.weight")) w.output = f.matrix<float>("output.weight");
  for (int l = 0; l < c.n_layer; ++l) {
    const std::string at = "blk." + std::to_string(l) + ".";
    Weights<float>::Block b;
    b.attn_norm = Eigen::Map<const Eigen::VectorXf>(f.values<float>(at + "attn_norm.weight").data(),
                                                    c.n_embd);
    b.ffn_norm =
        Eigen::Map<const Eigen::VectorXf>(f.values<float>(at + "ffn_norm.weight").data(), c.n_embd);
    for (int p = 0; p < kProjections; ++p)
      b.proj[p] = f.matrix<float>(at + gguf_name(static_cast<Proj>(p)) + ".weight");
    w.blocks.push_back(std::move(b));
  }
  return Model<float, Frozen>(c, std::move(w));
}

/// Writes `model`'s base weights (adapters not included) as an F32 GGUF llama model with the
/// byte-level vocabulary llama.cpp needs: <unk>, <s>, </s> and the 256 byte tokens <0x00>...<0xFF>.
template <typename Frozen>
void write_model_gguf(const std::string& path, const Model<float, Frozen>& model,
                      const std::string& name) {
  const Config& c = model.config();
  if (c.n_vocab != kByteVocab)
    throw std::invalid_argument(
        "llama_finetune: only the byte-level vocabulary (259 tokens) is written");
  lora::io::GgufWriter w;
  w.set_value("general.architecture", std::string("llama"));
  w.set_value("general.name", name);
  w.set_value("llama.context_length", static_cast<std::uint32_t>(c.n_ctx));
  w.set_value("llama.embedding_length", static_cast<std::uint32_t>(c.n_embd));
  w.set_value("llama.block_count", static_cast<std::uint32_t>(c.n_layer));
  w.set_value("llama.feed_forward_length", static_cast<std::uint32_t>(c.n_ff));
  w.set_value("llama.attention.head_count", static_cast<std::uint32_t>(c.n_head));
  w.set_value("llama.attention.head_count_kv", static_cast<std::uint32_t>(c.n_head_kv));
  w.set_value("llama.attention.layer_norm_rms_epsilon", c.rms_eps);
  w.set_value("llama.rope.freq_base", c.rope_base);
  w.set_value("llama.rope.dimension_count", static_cast<std::uint32_t>(c.head_dim()));
  write_byte_vocabulary(w);
  w.set_value("tokenizer.ggml.add_bos_token", false);
  using lora::io::GgmlType;
  w.add_matrix("token_embd.weight", model.token_embd().transpose(), GgmlType::F32);
  w.add_vector("output_norm.weight", model.output_norm(), GgmlType::F32);
  if (model.output()) w.add_matrix("output.weight", model.output()->base_weight(), GgmlType::F32);
  for (int l = 0; l < c.n_layer; ++l) {
    const std::string at = "blk." + std::to_string(l) + ".";
    w.add_vector(at + "attn_norm.weight", model.attn_norm(l), GgmlType::F32);
    w.add_vector(at + "ffn_norm.weight", model.ffn_norm(l), GgmlType::F32);
    for (int p = 0; p < kProjections; ++p)
      w.add_matrix(at + gguf_name(static_cast<Proj>(p)) + ".weight",
                   model.projection(l, static_cast<Proj>(p)).base_weight(), GgmlType::F32);
  }
  w.save(path);
}

/// The adapted projections of `model` by GGUF base-tensor name ("blk.0.attn_q.weight"), for
/// lora::gguf's save_adapter / load_adapter.
template <typename Frozen>
lora::peft::LayerRefs adapter_layers(Model<float, Frozen>& model) {
  lora::peft::LayerRefs refs;
  for (int l = 0; l < model.config().n_layer; ++l)
    for (int p = 0; p < kProjections; ++p) {
      auto& proj = model.projection(l, static_cast<Proj>(p));
      if (proj.adapted())
        refs.emplace("blk." + std::to_string(l) + "." + gguf_name(static_cast<Proj>(p)) + ".weight",
                     &proj.layer());
    }
  return refs;
}

/// Writes the adapters of `model` as a llama.cpp LoRA adapter (lora::gguf::save_adapter: one
/// alpha per file, any per-module factor folded into B).
template <typename Frozen>
void write_adapter_gguf(const std::string& path, Model<float, Frozen>& model) {
  lora::gguf::SaveOptions options;
  options.architecture = "llama";
  options.name = "lora llama demo adapter";
  lora::gguf::save_adapter(path, adapter_layers(model), options);
}

/// Puts the adapter of a llama.cpp LoRA file on `model` (which must carry none yet): the
/// projections it names get LoRALinear layers holding the file's A, B and scaling
/// (lora::gguf::load_adapter, all-or-nothing); everything else is frozen.
template <typename Frozen>
void apply_adapter_gguf(Model<float, Frozen>& model, const std::string& path) {
  const auto file = lora::gguf::read_adapter<float>(path);
  if (file.architecture != "llama")
    throw lora::io::FormatError("llama_finetune: \"" + path + "\" is an adapter for a " +
                                file.architecture + " model, not llama");
  std::vector<Proj> which;
  for (int p = 0; p < kProjections; ++p) {
    const std::string suffix = std::string(".") + gguf_name(static_cast<Proj>(p)) + ".weight";
    for (const auto& [name, adapter] : file.modules)
      if (name.size() > suffix.size() &&
          name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
        which.push_back(static_cast<Proj>(p));
        break;
      }
  }
  if (which.empty())
    throw lora::io::FormatError("llama_finetune: \"" + path +
                                "\" adapts none of the seven projections");
  model.adapt(file.modules.begin()->second.config(), which);
  // A projection adapted in some blocks only: those blocks' layers have no module in the file,
  // which load_adapter refuses (all-or-nothing) with the module's name.
  lora::gguf::load_adapter(path, adapter_layers(model));
}

}  // namespace llama
