// The llama demo's models and adapters as GGUF files, through lora's GGUF reader and writer: a
// base that llama.cpp loads as a `llama` model (with a byte-level SentencePiece vocabulary), and
// adapters in llama.cpp's LoRA format.
#pragma once

#include <lora/gguf.hpp>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

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
  c.n_head_kv = static_cast<int>(
      f.get_or<std::uint32_t>("llama.attention.head_count_kv", static_cast<std::uint32_t>(c.n_head)));
  c.n_ctx = static_cast<int>(f.get<std::uint32_t>("llama.context_length"));
  c.rms_eps = f.get<float>("llama.attention.layer_norm_rms_epsilon");
  c.rope_base = f.get_or<float>("llama.rope.freq_base", 10000.0f);
  const auto rot = f.get_or<std::uint32_t>("llama.rope.dimension_count",
                                           static_cast<std::uint32_t>(c.n_embd / std::max(1, c.n_head)));
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
  w.output_norm = Eigen::Map<const Eigen::VectorXf>(f.values<float>("output_norm.weight").data(), c.n_embd);
  if (f.contains("output.weight")) w.output = f.matrix<float>("output.weight");
  for (int l = 0; l < c.n_layer; ++l) {
    const std::string at = "blk." + std::to_string(l) + ".";
    Weights<float>::Block b;
    b.attn_norm = Eigen::Map<const Eigen::VectorXf>(f.values<float>(at + "attn_norm.weight").data(), c.n_embd);
    b.ffn_norm = Eigen::Map<const Eigen::VectorXf>(f.values<float>(at + "ffn_norm.weight").data(), c.n_embd);
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
    throw std::invalid_argument("llama_finetune: only the byte-level vocabulary (259 tokens) is written");
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
  std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
  std::vector<float> scores = {0.0f, 0.0f, 0.0f};
  std::vector<std::int32_t> types = {2, 3, 3};  // UNKNOWN, CONTROL, CONTROL
  for (int b = 0; b < 256; ++b) {
    char hex[8];
    std::snprintf(hex, sizeof hex, "<0x%02X>", b);
    tokens.emplace_back(hex);
    scores.push_back(0.0f);
    types.push_back(6);  // BYTE
  }
  w.set_value("tokenizer.ggml.model", std::string("llama"));
  w.set("tokenizer.ggml.tokens", lora::io::GgufValue::array(tokens));
  w.set("tokenizer.ggml.scores", lora::io::GgufValue::array(scores));
  w.set("tokenizer.ggml.token_type", lora::io::GgufValue::array(types));
  w.set_value("tokenizer.ggml.unknown_token_id", std::uint32_t{0});
  w.set_value("tokenizer.ggml.bos_token_id", std::uint32_t{1});
  w.set_value("tokenizer.ggml.eos_token_id", std::uint32_t{2});
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

/// Writes the adapters of `model` as a llama.cpp LoRA adapter: general.type "adapter",
/// adapter.type "lora", adapter.lora.alpha (f32, one per file), and for each adapted projection
/// `<base tensor>.lora_a` (ne = [in, r]: A's bytes) and `.lora_b` (ne = [r, out]: B's bytes).
/// Every adapter of the model must have the same rank and alpha (the demo's do).
template <typename Frozen>
void write_adapter_gguf(const std::string& path, const Model<float, Frozen>& model) {
  const Config& c = model.config();
  lora::io::GgufWriter w;
  w.set_value("general.architecture", std::string("llama"));
  w.set_value("general.type", std::string("adapter"));
  w.set_value("adapter.type", std::string("lora"));
  double alpha = -1;
  int rank = -1;
  for (int l = 0; l < c.n_layer; ++l)
    for (int p = 0; p < kProjections; ++p) {
      const auto& proj = model.projection(l, static_cast<Proj>(p));
      if (!proj.adapted()) continue;
      const auto& layer = proj.layer();
      if (rank < 0) {
        rank = static_cast<int>(layer.rank());
        alpha = layer.config().alpha;
        w.set_value("adapter.lora.alpha", static_cast<float>(alpha));
      }
      if (layer.rank() != rank || layer.config().alpha != alpha || layer.config().use_rslora)
        throw std::invalid_argument(
            "llama_finetune: adapters of different ranks or alphas, or rsLoRA, need the library's "
            "GGUF adapter writer (lora::gguf), which folds the scale into B");
      const std::string base = "blk." + std::to_string(l) + "." + gguf_name(static_cast<Proj>(p)) + ".weight";
      w.add_matrix(base + ".lora_a", layer.A(), lora::io::GgmlType::F32);
      w.add_matrix(base + ".lora_b", layer.B(), lora::io::GgmlType::F32);
    }
  if (rank < 0) throw std::invalid_argument("llama_finetune: the model has no adapter to write");
  w.save(path);
}

/// Puts the LoRA adapter of a llama.cpp adapter file on `model` (which must carry none yet):
/// the projections the file adapts get LoRALinear layers with its A, B and alpha; everything else
/// is frozen.
template <typename Frozen>
void apply_adapter_gguf(Model<float, Frozen>& model, const std::string& path) {
  const auto f = lora::io::GgufFile::load(path);
  auto require = [&](bool ok, const std::string& what) {
    if (!ok) throw lora::io::FormatError("llama_finetune: \"" + path + "\": " + what);
  };
  require(f.get_or<std::string>("general.type", "") == "adapter" &&
              f.get_or<std::string>("adapter.type", "") == "lora",
          "not a llama.cpp LoRA adapter (general.type \"adapter\", adapter.type \"lora\")");
  require(f.get<std::string>("general.architecture") == "llama", "not an adapter of a llama model");
  const Config& c = model.config();
  const double alpha = f.get<float>("adapter.lora.alpha");
  std::vector<Proj> which;
  int rank = -1;
  for (int p = 0; p < kProjections; ++p) {
    int present = 0;
    for (int l = 0; l < c.n_layer; ++l) {
      const std::string base = "blk." + std::to_string(l) + "." + gguf_name(static_cast<Proj>(p)) + ".weight";
      const bool a = f.contains(base + ".lora_a"), b = f.contains(base + ".lora_b");
      require(a == b, "half a pair: " + base + (a ? ".lora_a without .lora_b" : ".lora_b without .lora_a"));
      if (!a) continue;
      ++present;
      const int r = static_cast<int>(f.info(base + ".lora_a").rows());
      require(rank < 0 || r == rank, "adapters of different ranks are not supported by this program");
      rank = r;
    }
    require(present == 0 || present == c.n_layer,
            std::string(gguf_name(static_cast<Proj>(p))) + " is adapted in some blocks only");
    if (present) which.push_back(static_cast<Proj>(p));
  }
  require(!which.empty(), "no lora_a / lora_b tensor for this model's projections");
  lora::LoRAConfig cfg;
  cfg.rank = rank;
  cfg.alpha = alpha;
  model.adapt(cfg, which);
  for (int l = 0; l < c.n_layer; ++l)
    for (Proj p : which) {
      const std::string base = "blk." + std::to_string(l) + "." + gguf_name(p) + ".weight";
      auto& layer = model.projection(l, p).layer();
      const Eigen::MatrixXf A = f.matrix<float>(base + ".lora_a"), B = f.matrix<float>(base + ".lora_b");
      require(A.cols() == layer.in_features() && B.rows() == layer.out_features() && B.cols() == rank,
              base + ": lora_a or lora_b does not fit the model's " + std::to_string(layer.out_features()) +
                  " x " + std::to_string(layer.in_features()) + " weight");
      layer.set_adapter_weights(A, B);
    }
}

}  // namespace llama
