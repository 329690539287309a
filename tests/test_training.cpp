// End to end: a frozen layer must learn a hidden rank-r change of its weight, Y = (W0 + P Q) X,
// through its adapter alone, with the library's optimizers. Fast (well under a second).
#include "test_helpers.hpp"

#include <lora/lora.hpp>
#include <lora/optim.hpp>

#include <gtest/gtest.h>

#include <cstring>

namespace test_training {
namespace {

using Matrix = Eigen::MatrixXf;

struct Task {
  Matrix W0, X, Y, delta;  // delta = P Q, the change to learn
};

Task make_task(int d, int k, int true_rank, int n) {
  lora::Rng rng(31);
  Task t{Matrix(d, k), Matrix(k, n), Matrix(d, n), Matrix()};
  Matrix P(d, true_rank), Q(true_rank, k);
  lora::fill_normal(t.W0, rng, 0, 1.0 / std::sqrt(double(k)));
  lora::fill_normal(P, rng, 0, 0.5);
  lora::fill_normal(Q, rng, 0, 1.0 / std::sqrt(double(k)));
  lora::fill_normal(t.X, rng, 0, 1);
  t.delta = P * Q;
  t.Y = (t.W0 + t.delta) * t.X;
  return t;
}

float mse(const Matrix& H, const Matrix& Y) {
  return 0.5f * (H - Y).squaredNorm() / Y.cols();
}

/// Trains the layer's adapter on the task for `steps` full-batch steps; returns the final loss
/// (evaluated in eval mode, i.e. without dropout).
template <typename Opt>
float train(lora::LoRALinear<float>& layer, const Task& t, Opt& opt, int steps) {
  const auto params = lora::adapter_parameters(layer);
  Matrix H(t.Y.rows(), t.Y.cols()), G(t.Y.rows(), t.Y.cols());
  lora::Workspace<float> ws;
  for (int s = 0; s < steps; ++s) {
    layer.train();
    opt.zero_grad();
    layer.forward(t.X, H, ws);
    G = (H - t.Y) / float(t.Y.cols());  // dL/dH of 0.5/n ||H - Y||^2
    layer.backward_without_input_grad(t.X, G, ws);
    lora::clip_grad_norm(params, 10.0f);
    opt.step();
  }
  layer.eval();
  return mse(layer.forward(t.X), t.Y);
}

lora::AdamWOptions adamw(double lr) {
  return {lr, 0.9, 0.999, 1e-8, /*weight_decay=*/0};
}

lora::LoRAConfig config(int r, double dropout = 0) {
  lora::LoRAConfig cfg;
  cfg.rank = r;
  cfg.alpha = 2.0 * r;
  cfg.seed = 5;
  cfg.dropout = dropout;
  return cfg;
}

TEST(Training, AdamWLearnsARankTwoChange) {
  const Task t = make_task(48, 32, 2, 256);
  lora::LoRALinear<float> layer(t.W0, config(2));
  const float initial = mse(layer.forward(t.X), t.Y);
  lora::AdamW<float> opt(lora::adapter_parameters(layer), adamw(2e-2));
  const float final_loss = train(layer, t, opt, 600);
  EXPECT_LT(final_loss, 1e-4f * initial) << "initial " << initial;
  // It learned the change itself, not just something that fits X.
  EXPECT_MATRIX_NEAR(layer.delta_weight(), t.delta, 1e-2);
  // And W0 was never written.
  EXPECT_EQ(std::memcmp(layer.weight().data(), t.W0.data(), sizeof(float) * t.W0.size()), 0);
}

TEST(Training, SGDWithNesterovMomentumLearnsIt) {
  const Task t = make_task(48, 32, 2, 256);
  lora::LoRALinear<float> layer(t.W0, config(4));  // a larger rank than needed is fine
  const float initial = mse(layer.forward(t.X), t.Y);
  lora::SGD<float> opt(lora::adapter_parameters(layer), {0.01, 0.9, 0, true});
  EXPECT_LT(train(layer, t, opt, 600), 1e-4f * initial) << "initial " << initial;
}

TEST(Training, AdamWLearnsItThroughDropout) {
  const Task t = make_task(48, 32, 2, 256);
  lora::LoRALinear<float> layer(t.W0, config(2, 0.1));
  const float initial = mse(layer.forward(t.X), t.Y);
  lora::AdamW<float> opt(lora::adapter_parameters(layer), adamw(1e-2));
  // Dropout on the input does not reach zero: in expectation it adds a ridge penalty
  // p/(1-p) sum_j ||s B A diag(x_j)||^2 to the loss, which shrinks B A below the true change.
  // The fit is still good, and far better than the rank-1 control below.
  EXPECT_LT(train(layer, t, opt, 600), 3e-2f * initial) << "initial " << initial;
}

// The control: a rank-1 adapter cannot represent a rank-2 change, and the same loop does not get
// near the thresholds above: they are a real test of the fit.
TEST(Training, ARankOneAdapterCannotFitARankTwoChange) {
  const Task t = make_task(48, 32, 2, 256);
  lora::LoRALinear<float> layer(t.W0, config(1));
  const float initial = mse(layer.forward(t.X), t.Y);
  lora::AdamW<float> opt(lora::adapter_parameters(layer), adamw(2e-2));
  EXPECT_GT(train(layer, t, opt, 600), 5e-2f * initial) << "initial " << initial;
}

}  // namespace
}  // namespace test_training
