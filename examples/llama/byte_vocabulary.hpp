// The byte-level vocabulary as GGUF metadata: llama.cpp's SentencePiece ("llama") tokenizer with
// <unk> = 0, <s> = 1, </s> = 2 and the 256 byte tokens <0x00> ... <0xFF> = 3 ... 258 (text_data.hpp
// cuts text into these). Written by the example's model files and by the tests' tiny llama.
#pragma once

#include <lora/io/gguf_writer.hpp>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace llama {

/// Sets tokenizer.ggml.{model, tokens, scores, token_type} and the <unk>, <s>, </s> ids in `w`,
/// with the types llama.cpp reads (token_type: 2 unknown, 3 control, 6 byte).
inline void write_byte_vocabulary(lora::io::GgufWriter& w) {
  std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
  std::vector<float> scores = {0.0f, 0.0f, 0.0f};
  std::vector<std::int32_t> types = {2, 3, 3};
  for (int b = 0; b < 256; ++b) {
    char hex[8];
    std::snprintf(hex, sizeof hex, "<0x%02X>", b);
    tokens.emplace_back(hex);
    scores.push_back(0.0f);
    types.push_back(6);
  }
  w.set_value("tokenizer.ggml.model", std::string("llama"));
  w.set("tokenizer.ggml.tokens", lora::io::GgufValue::array(tokens));
  w.set("tokenizer.ggml.scores", lora::io::GgufValue::array(scores));
  w.set("tokenizer.ggml.token_type", lora::io::GgufValue::array(types));
  w.set_value("tokenizer.ggml.unknown_token_id", std::uint32_t{0});
  w.set_value("tokenizer.ggml.bos_token_id", std::uint32_t{1});
  w.set_value("tokenizer.ggml.eos_token_id", std::uint32_t{2});
}

}  // namespace llama
