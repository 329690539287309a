// Training and evaluation loops of the llama demo: AdamW with linear warm-up and cosine decay,
// gradient clipping, held-out perplexity, and greedy generation.
#pragma once

#include <lora/core.hpp>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <limits>
#include <vector>

#include "llama/llama_model.hpp"
#include "llama/text_data.hpp"

namespace llama {

struct TrainOptions {
  int steps = 200;          ///< optimizer steps
  int batch = 8;            ///< sequences per step
  int seq_len = 128;        ///< tokens per sequence
  double lr = 3e-3;         ///< peak learning rate
  double warmup = 0.05;     ///< fraction of steps of linear warm-up, then cosine decay to 0
  double clip = 1.0;        ///< gradient-norm clip
  double weight_decay = 0;  ///< AdamW's decoupled decay
  std::uint64_t seed = 1;   ///< batches' seed
};

struct TrainResult {
  double final_loss = 0;  ///< mean training loss of the last 10% of steps
  double seconds = 0;     ///< wall time of the steps
  long long tokens = 0;   ///< tokens processed
};

/// Keeps freed memory in the process. A training step here allocates its activations and
/// gradients anew (readable code, no workspace), and glibc by default maps blocks above 128 KiB
/// with mmap, unmaps them on free and trims the heap's top: every step then page-faults and zeroes
/// all its temporaries again, a large share of the fp32 step of BM_LlamaTrainStep on the machine
/// of docs/llama.md. With the largest mmap threshold glibc allows (32 MiB) and no trimming, the
/// blocks are reused from step to step, as PyTorch's caching allocators reuse theirs; the peak is
/// unchanged. Call it once, before training; a no-op outside glibc.
inline void keep_freed_memory() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, INT_MAX);
#endif
}

/// lr at step t (0-based) of n: linear warm-up over w steps, then cosine decay to 0.
inline double cosine_with_warmup(int t, int n, int w, double peak) {
  if (t < w) return peak * (t + 1) / w;
  const double progress = static_cast<double>(t - w) / std::max(1, n - w);
  return peak * 0.5 * (1.0 + std::cos(3.14159265358979323846 * progress));
}

/// Trains whatever in `model` is trainable on random windows of `tokens`.
template <typename Model>
TrainResult train(Model& model, const std::vector<int>& tokens, const TrainOptions& o) {
  auto params = model.parameters();
  lora::AdamWOptions adam;
  adam.lr = o.lr;
  adam.weight_decay = o.weight_decay;
  lora::AdamW<float> optimizer(params, adam);
  lora::Rng rng(o.seed);
  const int warmup = std::max(1, static_cast<int>(o.warmup * o.steps));
  TrainResult result;
  double tail_sum = 0;
  int tail_count = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int step = 0; step < o.steps; ++step) {
    const std::vector<int> batch = random_batch(tokens, o.batch, o.seq_len, rng);
    model.zero_grad();
    model.forward(batch, o.seq_len);
    const double loss = model.loss_and_grad();
    model.backward();
    lora::clip_grad_norm(params, static_cast<float>(o.clip));
    optimizer.set_learning_rate(cosine_with_warmup(step, o.steps, warmup, o.lr));
    optimizer.step();
    if (step >= o.steps - std::max(1, o.steps / 10)) {
      tail_sum += loss;
      ++tail_count;
    }
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result.final_loss = tail_sum / std::max(1, tail_count);
  result.tokens = static_cast<long long>(o.steps) * o.batch * o.seq_len;
  return result;
}

/// exp(mean next-token cross-entropy) over the windows (a batch of `batch` windows at a time).
template <typename Model>
double perplexity(Model& model, const std::vector<std::vector<int>>& windows, int batch = 8) {
  double total = 0;
  std::size_t counted = 0;
  for (std::size_t w = 0; w < windows.size(); w += static_cast<std::size_t>(batch)) {
    std::vector<int> tokens;
    std::size_t n = 0;
    for (; n < static_cast<std::size_t>(batch) && w + n < windows.size(); ++n)
      tokens.insert(tokens.end(), windows[w + n].begin(), windows[w + n].end());
    const int L = static_cast<int>(windows[w].size());
    model.forward(tokens, L);
    total += model.loss_and_grad() * static_cast<double>(n);
    counted += n;
  }
  return std::exp(total / static_cast<double>(counted));
}

/// Natural-log probabilities of every token at the position after the last of `tokens`, in
/// double. (Scalar loops: GCC 12 wrongly warns inside Eigen's AVX-512 double max/exp.)
template <typename Model>
Eigen::VectorXd next_token_log_probs(Model& model, const std::vector<int>& tokens) {
  const auto& logits = model.forward(tokens, static_cast<int>(tokens.size()));
  const Eigen::Index last = logits.cols() - 1;
  double m = -std::numeric_limits<double>::infinity();
  for (Eigen::Index i = 0; i < logits.rows(); ++i)
    m = std::max(m, static_cast<double>(logits(i, last)));
  double z = 0;
  for (Eigen::Index i = 0; i < logits.rows(); ++i)
    z += std::exp(static_cast<double>(logits(i, last)) - m);
  Eigen::VectorXd out(logits.rows());
  for (Eigen::Index i = 0; i < logits.rows(); ++i)
    out(i) = static_cast<double>(logits(i, last)) - m - std::log(z);
  return out;
}

/// Greedy continuation of `prompt` by `count` tokens (the window slides at n_ctx).
template <typename Model>
std::vector<int> generate_greedy(Model& model, std::vector<int> prompt, int count) {
  const int ctx = model.config().n_ctx;
  for (int i = 0; i < count; ++i) {
    std::vector<int> window(prompt.end() - std::min<long>(ctx, static_cast<long>(prompt.size())),
                            prompt.end());
    const Eigen::VectorXd lp = next_token_log_probs(model, window);
    Eigen::Index best = 0;
    for (Eigen::Index i = 1; i < lp.size(); ++i)
      if (lp(i) > lp(best)) best = i;
    prompt.push_back(static_cast<int>(best));
  }
  return prompt;
}

}  // namespace llama
