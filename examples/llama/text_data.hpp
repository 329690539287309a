// Text for the llama demo, as byte-level tokens: the King James Version of the Bible from Debian's
// bible-kjv package (its `bible` program prints verses; the translation of 1611 is in the public
// domain), and the training batches and held-out windows cut from it.
//
// The vocabulary is llama.cpp's byte-level SentencePiece layout: <unk> = 0, <s> = 1, </s> = 2,
// then the 256 byte tokens <0x00> ... <0xFF> = 3 ... 258, so byte b is token b + 3.
#pragma once

#include <lora/random.hpp>

#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace llama {

inline constexpr int kByteTokenOffset = 3;  ///< token of byte b: b + 3
inline constexpr int kByteVocab = 259;      ///< 3 specials + 256 bytes

inline std::vector<int> bytes_to_tokens(const std::string& text) {
  std::vector<int> tokens;
  tokens.reserve(text.size());
  for (unsigned char c : text) tokens.push_back(c + kByteTokenOffset);
  return tokens;
}

inline std::string tokens_to_bytes(const std::vector<int>& tokens) {
  std::string text;
  for (int t : tokens)
    if (t >= kByteTokenOffset && t < kByteVocab)
      text.push_back(static_cast<char>(t - kByteTokenOffset));
  return text;
}

/// The verses of `spec` (the `bible` program's verse range, e.g. "Ge1:1-Es10:3"), one per line,
/// without their references. Throws std::runtime_error when the program is missing or says nothing.
inline std::string read_kjv(const std::string& spec) {
  const std::string command = "bible -f '" + spec + "' 2>/dev/null";
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) throw std::runtime_error("llama demo: cannot run Debian's `bible` program");
  std::string out, line;
  char buffer[4096];
  while (std::fgets(buffer, sizeof buffer, pipe)) {
    line += buffer;
    if (line.empty() || line.back() != '\n') continue;
    // "Ge1:1 In the beginning ..." -> "In the beginning ..."
    const std::size_t space = line.find(' ');
    if (space != std::string::npos && space + 1 < line.size()) out += line.substr(space + 1);
    line.clear();
  }
  const int status = pclose(pipe);
  if (status != 0 || out.size() < 1000)
    throw std::runtime_error(
        "llama demo: Debian's bible-kjv is needed for the demo's text (`bible -f '" + spec +
        "'` printed nothing): apt-get install bible-kjv, or run scripts/llama_demo, which installs "
        "it");
  return out;
}

/// A text split into training and held-out tokens (the last `held_out_fraction`).
struct Corpus {
  std::string name;
  std::vector<int> train, held_out;
};

inline Corpus make_corpus(std::string name, const std::string& text, double held_out_fraction) {
  const std::vector<int> all = bytes_to_tokens(text);
  const auto cut =
      static_cast<std::size_t>(static_cast<double>(all.size()) * (1.0 - held_out_fraction));
  return {std::move(name), std::vector<int>(all.begin(), all.begin() + static_cast<long>(cut)),
          std::vector<int>(all.begin() + static_cast<long>(cut), all.end())};
}

/// The demo's two kinds of text, the last 5% of each held out: narrative prose (Genesis to
/// Esther) for the base, poetry and wisdom (Psalms to the Song of Solomon) for the adapter.
inline Corpus prose_corpus() {
  return make_corpus("prose (Genesis-Esther)", read_kjv("Ge1:1-Es10:3"), 0.05);
}
inline Corpus poetry_corpus() {
  return make_corpus("poetry (Psalms-Song)", read_kjv("Ps1:1-Song8:14"), 0.05);
}

/// The held-out windows the demo reports perplexity on.
inline int demo_eval_windows(bool quick) {
  return quick ? 8 : 64;
}

/// S random windows of L tokens from `tokens`, concatenated (sequence s at s L ... s L + L - 1).
inline std::vector<int> random_batch(const std::vector<int>& tokens, int S, int L, lora::Rng& rng) {
  if (tokens.size() <= static_cast<std::size_t>(L)) throw std::runtime_error("text shorter than L");
  std::vector<int> batch;
  batch.reserve(static_cast<std::size_t>(S) * L);
  const std::uint64_t span = tokens.size() - static_cast<std::size_t>(L);
  for (int s = 0; s < S; ++s) {
    const auto start = static_cast<std::size_t>(rng.next() % span);
    batch.insert(batch.end(), tokens.begin() + static_cast<long>(start),
                 tokens.begin() + static_cast<long>(start) + L);
  }
  return batch;
}

/// The held-out text as consecutive windows of L tokens (the incomplete tail dropped), at most
/// `max_windows` of them, evenly spread.
inline std::vector<std::vector<int>> eval_windows(const std::vector<int>& tokens, int L,
                                                  int max_windows) {
  std::vector<std::vector<int>> windows;
  const std::size_t count = tokens.size() / static_cast<std::size_t>(L);
  const std::size_t step = count > static_cast<std::size_t>(max_windows) ? count / max_windows : 1;
  for (std::size_t w = 0; w < count && windows.size() < static_cast<std::size_t>(max_windows);
       w += step)
    windows.emplace_back(tokens.begin() + static_cast<long>(w * L),
                         tokens.begin() + static_cast<long>((w + 1) * L));
  return windows;
}

}  // namespace llama
