// llama.cpp as a judge in tests: loads a GGUF model and LoRA adapters with llama.cpp's own library
// (the prebuilt libllama that scripts/fetch_llama_cpp installs, used through the llama.h of the
// same release), evaluates token ids, and returns llama.cpp's next-token log-probabilities: the
// log-softmax of llama_get_logits_ith, computed here in double. Nothing of llama.cpp is
// reimplemented: the numbers are its own.
//
//   llama_cpp::Model model("tiny.gguf");                    // throws llama_cpp::Refused on failure
//   llama_cpp::Adapter a(model, "adapter.gguf");            // likewise, with llama.cpp's message
//   Eigen::MatrixXd lp = model.log_probs({1, 5, 9}, {{&a, 1.0f}});   // n_vocab x n_tokens
//
// The context keeps the KV cache in f32 (llama.cpp's default is f16, whose rounding would hide a
// 1e-4 comparison) and runs without flash attention, on the CPU back end only.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ggml-backend.h"
#include "llama.h"

namespace llama_cpp {

/// llama.cpp refused a model or an adapter; what() holds its log's error lines.
class Refused : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

/// llama.cpp's log since the last take_log(): errors and warnings (the rest is dropped, unless
/// LORA_LLAMA_CPP_VERBOSE is set, when everything is printed to stderr).
inline std::string& log_buffer() {
  static std::string log;
  return log;
}

inline void log_callback(ggml_log_level level, const char* text, void*) {
  static const bool verbose = std::getenv("LORA_LLAMA_CPP_VERBOSE") != nullptr;
  if (verbose) std::fputs(text, stderr);
  if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_CONT)
    log_buffer() += text;
}

inline std::string take_log() {
  std::string out;
  std::swap(out, log_buffer());
  return out;
}

/// Loads the CPU back end and initializes llama.cpp once per process.
inline void init_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    llama_log_set(log_callback, nullptr);
    ggml_backend_load_all_from_path(LORA_LLAMA_CPP_LIB_DIR);
    llama_backend_init();
  });
}

}  // namespace detail

class Adapter;

/// A model loaded by llama.cpp from a GGUF file (CPU only, no mmap so that the file can be
/// replaced while loaded).
class Model {
 public:
  explicit Model(const std::string& path) {
    detail::init_once();
    detail::take_log();
    llama_model_params p = llama_model_default_params();
    p.n_gpu_layers = 0;
    p.load_mode = LLAMA_LOAD_MODE_NONE;
    model_ = llama_model_load_from_file(path.c_str(), p);
    if (model_ == nullptr)
      throw Refused("llama.cpp refused the model \"" + path + "\": " + detail::take_log());
  }
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;
  ~Model() { llama_model_free(model_); }

  llama_model* get() const { return model_; }
  int n_vocab() const { return llama_vocab_n_tokens(llama_model_get_vocab(model_)); }

  /// llama.cpp's next-token log-probabilities after each of `tokens` (one column per position,
  /// n_vocab rows), with `adapters` applied at their scales (none: the bare model). A fresh
  /// context per call, so calls do not share a KV cache.
  Eigen::MatrixXd log_probs(
      const std::vector<llama_token>& tokens,
      const std::vector<std::pair<const Adapter*, float>>& adapters = {}) const;

 private:
  llama_model* model_ = nullptr;
};

/// A LoRA adapter loaded by llama.cpp for a model (freed with it, or here).
class Adapter {
 public:
  Adapter(const Model& model, const std::string& path) {
    detail::take_log();
    adapter_ = llama_adapter_lora_init(model.get(), path.c_str());
    if (adapter_ == nullptr)
      throw Refused("llama.cpp refused the adapter \"" + path + "\": " + detail::take_log());
  }
  Adapter(const Adapter&) = delete;
  Adapter& operator=(const Adapter&) = delete;
  ~Adapter() { llama_adapter_lora_free(adapter_); }

  llama_adapter_lora* get() const { return adapter_; }

 private:
  llama_adapter_lora* adapter_ = nullptr;
};

inline Eigen::MatrixXd Model::log_probs(
    const std::vector<llama_token>& tokens,
    const std::vector<std::pair<const Adapter*, float>>& adapters) const {
  const auto n = static_cast<std::uint32_t>(tokens.size());
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = std::max<std::uint32_t>(64, n);
  cp.n_batch = cp.n_ctx;
  cp.n_ubatch = cp.n_ctx;
  cp.n_threads = 1;
  cp.n_threads_batch = 1;
  cp.type_k = GGML_TYPE_F32;
  cp.type_v = GGML_TYPE_F32;
  cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
  cp.no_perf = true;
  llama_context* ctx = llama_init_from_model(model_, cp);
  if (ctx == nullptr) throw Refused("llama.cpp could not create a context: " + detail::take_log());
  struct Free {
    llama_context* ctx;
    ~Free() { llama_free(ctx); }
  } free_ctx{ctx};

  std::vector<llama_adapter_lora*> ptrs;
  std::vector<float> scales;
  for (const auto& [a, s] : adapters) {
    ptrs.push_back(a->get());
    scales.push_back(s);
  }
  if (llama_set_adapters_lora(ctx, ptrs.data(), ptrs.size(), scales.data()) != 0)
    throw Refused("llama.cpp refused to set the adapters: " + detail::take_log());

  llama_batch batch = llama_batch_init(static_cast<std::int32_t>(n), 0, 1);
  struct FreeBatch {
    llama_batch& b;
    ~FreeBatch() { llama_batch_free(b); }
  } free_batch{batch};
  for (std::uint32_t i = 0; i < n; ++i) {
    batch.token[i] = tokens[i];
    batch.pos[i] = static_cast<llama_pos>(i);
    batch.n_seq_id[i] = 1;
    batch.seq_id[i][0] = 0;
    batch.logits[i] = 1;
  }
  batch.n_tokens = static_cast<std::int32_t>(n);
  if (llama_decode(ctx, batch) != 0) throw Refused("llama_decode failed: " + detail::take_log());

  const int V = n_vocab();
  Eigen::MatrixXd out(V, n);
  for (std::uint32_t i = 0; i < n; ++i) {
    const float* logits = llama_get_logits_ith(ctx, static_cast<std::int32_t>(i));
    if (logits == nullptr) throw Refused("llama.cpp returned no logits: " + detail::take_log());
    double mx = -INFINITY;
    for (int v = 0; v < V; ++v) mx = std::max(mx, static_cast<double>(logits[v]));
    double sum = 0;
    for (int v = 0; v < V; ++v) sum += std::exp(static_cast<double>(logits[v]) - mx);
    const double lse = mx + std::log(sum);
    for (int v = 0; v < V; ++v) out(v, i) = static_cast<double>(logits[v]) - lse;
  }
  return out;
}

}  // namespace llama_cpp
