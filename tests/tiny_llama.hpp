// A tiny llama-architecture model for tests, written as GGUF by lora's writer: 2 blocks, n_embd
// 64, 2 query heads and 1 key/value head (grouped-query attention, so that the q and k
// permutations differ), n_ff 128, a vocabulary of the 259 tokens llama.cpp's SPM tokenizer needs
// (<unk>, <s>, </s> and the byte tokens <0x00>..<0xFF>, type 6: without them llama.cpp crashes).
// Weights are random with a fixed seed, scaled so that the next-token distribution is far from
// uniform. Tests feed token ids, never text.
#pragma once

#include <Eigen/Core>

#include <cstdint>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "llama/byte_vocabulary.hpp"
#include "lora/io/gguf_writer.hpp"

namespace tiny_llama {

struct Config {
  int n_embd = 64;
  int n_head = 2;
  int n_head_kv = 1;
  int n_ff = 128;
  int n_layer = 2;
  int n_vocab = 259;
  int n_ctx = 128;
  float rms_eps = 1e-5f;
  int head_dim() const { return n_embd / n_head; }
};

/// The model's weights by GGUF name: linear weights out x in (as PyTorch's, ne = [in, out] in the
/// file), norms as 1 x n rows.
struct Model {
  Config config;
  std::map<std::string, Eigen::MatrixXf> weights;  // 2-D weights, out x in
  std::map<std::string, Eigen::VectorXf> norms;    // 1-D norm weights
};

inline std::string block(int i, const char* what) {
  return "blk." + std::to_string(i) + "." + what + ".weight";
}

/// A model with random weights (seeded).
inline Model make(unsigned seed = 7, const Config& c = Config{}) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto random = [&](int rows, int cols, float scale) {
    Eigen::MatrixXf m(rows, cols);
    for (int j = 0; j < cols; ++j)
      for (int i = 0; i < rows; ++i) m(i, j) = normal(rng) * scale;
    return m;
  };
  auto norm = [&](int n) {
    Eigen::VectorXf v(n);
    for (int i = 0; i < n; ++i) v(i) = 1.0f + 0.1f * normal(rng);
    return v;
  };
  Model m;
  m.config = c;
  const int kv = c.n_head_kv * c.head_dim();
  const float in_scale = 1.0f / std::sqrt(static_cast<float>(c.n_embd));
  m.weights["token_embd.weight"] = random(c.n_vocab, c.n_embd, 1.0f);
  for (int i = 0; i < c.n_layer; ++i) {
    m.norms[block(i, "attn_norm")] = norm(c.n_embd);
    m.weights[block(i, "attn_q")] = random(c.n_embd, c.n_embd, 2.0f * in_scale);
    m.weights[block(i, "attn_k")] = random(kv, c.n_embd, 2.0f * in_scale);
    m.weights[block(i, "attn_v")] = random(kv, c.n_embd, in_scale);
    m.weights[block(i, "attn_output")] = random(c.n_embd, c.n_embd, in_scale);
    m.norms[block(i, "ffn_norm")] = norm(c.n_embd);
    m.weights[block(i, "ffn_gate")] = random(c.n_ff, c.n_embd, in_scale);
    m.weights[block(i, "ffn_up")] = random(c.n_ff, c.n_embd, in_scale);
    m.weights[block(i, "ffn_down")] = random(c.n_embd, c.n_ff, 1.0f / std::sqrt(128.0f));
  }
  m.norms["output_norm.weight"] = norm(c.n_embd);
  m.weights["output.weight"] = random(c.n_vocab, c.n_embd, 3.0f * in_scale);
  return m;
}

/// The GGUF writer of the model: llama.cpp's metadata (with the exact types it reads) and every
/// tensor, 2-D weights as `type`, norms as f32 (llama.cpp wants them so). Tensors in llama.cpp's
/// usual order. Weights in `replaced` are written instead of the model's (a merged model).
inline lora::io::GgufWriter writer(const Model& m,
                                   lora::io::GgmlType type = lora::io::GgmlType::F32,
                                   const std::map<std::string, Eigen::MatrixXf>& replaced = {}) {
  using lora::io::GgufValue;
  const Config& c = m.config;
  lora::io::GgufWriter w;
  w.set_value("general.architecture", std::string("llama"));
  w.set_value("general.name", std::string("lora tiny llama"));
  w.set_value("llama.context_length", static_cast<std::uint32_t>(c.n_ctx));
  w.set_value("llama.embedding_length", static_cast<std::uint32_t>(c.n_embd));
  w.set_value("llama.block_count", static_cast<std::uint32_t>(c.n_layer));
  w.set_value("llama.feed_forward_length", static_cast<std::uint32_t>(c.n_ff));
  w.set_value("llama.attention.head_count", static_cast<std::uint32_t>(c.n_head));
  w.set_value("llama.attention.head_count_kv", static_cast<std::uint32_t>(c.n_head_kv));
  w.set_value("llama.attention.layer_norm_rms_epsilon", c.rms_eps);
  w.set_value("llama.rope.dimension_count", static_cast<std::uint32_t>(c.head_dim()));
  llama::write_byte_vocabulary(w);  // the llama example's vocabulary: ids 3..258 are bytes

  auto weight = [&](const std::string& name) {
    const auto it = replaced.find(name);
    w.add_matrix(name, it != replaced.end() ? it->second : m.weights.at(name), type);
  };
  weight("token_embd.weight");
  for (int i = 0; i < c.n_layer; ++i) {
    w.add_vector(block(i, "attn_norm"), m.norms.at(block(i, "attn_norm")), lora::io::GgmlType::F32);
    for (const char* t : {"attn_q", "attn_k", "attn_v", "attn_output"}) weight(block(i, t));
    w.add_vector(block(i, "ffn_norm"), m.norms.at(block(i, "ffn_norm")), lora::io::GgmlType::F32);
    for (const char* t : {"ffn_gate", "ffn_up", "ffn_down"}) weight(block(i, t));
  }
  w.add_vector("output_norm.weight", m.norms.at("output_norm.weight"), lora::io::GgmlType::F32);
  if (m.weights.count("output.weight"))  // without it llama.cpp ties the head to token_embd
    weight("output.weight");
  return w;
}

/// Token ids to evaluate: <s> then bytes (ids 3..258).
inline std::vector<std::int32_t> prompt() {
  return {1, 72, 104, 3, 250, 19, 111, 88, 42, 7};
}

}  // namespace tiny_llama
