// Minibatch AdamW training of an AttentionModel on a fixed data set: whatever the model marks as
// trainable (dense weights, LoRA adapters, embeddings, head) is what the optimizer sees.
#pragma once

#include "attention/attention_model.hpp"
#include "attention/sequence_tasks.hpp"

#include <lora/optim.hpp>
#include <lora/random.hpp>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace attention {

struct TrainOptions {
  int steps = 1000;
  int batch_size = 64;
  int warmup_steps = 50;  ///< linear warm-up, then linear decay to 0
  double clip_norm = 1.0;
  lora::AdamWOptions adamw;
  std::uint64_t seed = 0;  ///< order of the minibatches
};

/// Trains `model` on `data` and returns the mean loss of the last tenth of the steps.
template <typename T>
double train(AttentionModel<T>& model, const Batch& data, const TrainOptions& opt) {
  if (opt.batch_size < 1 || opt.batch_size > data.size() || opt.steps < 1)
    throw std::invalid_argument("attention::train: need 1 <= batch_size <= data size (" +
                                std::to_string(data.size()) + ") and steps >= 1, got batch_size " +
                                std::to_string(opt.batch_size) + ", steps " +
                                std::to_string(opt.steps));
  auto params = model.trainable_parameters();
  lora::AdamW<T> adamw(params, opt.adamw);
  lora::Rng rng(opt.seed);
  const int L = model.config().seq_len, n = data.size();
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  int cursor = n;  // reshuffle on the first step
  Batch batch;
  double tail_loss = 0;
  int tail_count = 0;
  for (int step = 0; step < opt.steps; ++step) {
    if (cursor + opt.batch_size > n) {  // a new epoch: Fisher-Yates shuffle
      for (int i = n - 1; i > 0; --i) std::swap(order[i], order[uniform_int(rng, i + 1)]);
      cursor = 0;
    }
    gather(data, order, cursor, cursor + opt.batch_size, L, batch);
    cursor += opt.batch_size;
    const double warm = std::min(1.0, (step + 1.0) / std::max(1, opt.warmup_steps));
    const double decay = 1.0 - static_cast<double>(step) / opt.steps;
    adamw.set_learning_rate(opt.adamw.lr * std::min(warm, decay));
    adamw.zero_grad();
    const double loss = model.loss_and_backward(batch);
    if (opt.clip_norm > 0) lora::clip_grad_norm(params, static_cast<T>(opt.clip_norm));
    adamw.step();
    if (step >= opt.steps - std::max(1, opt.steps / 10)) {
      tail_loss += loss;
      ++tail_count;
    }
  }
  return tail_count ? tail_loss / tail_count : 0.0;
}

}  // namespace attention
