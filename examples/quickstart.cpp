// Quickstart: a frozen layer W0 must learn a hidden rank-4 change. A LoRA adapter of rank 4 learns
// it with plain SGD while W0 stays frozen; then the adapter is merged for inference.
//
//   target:  Y = (W0 + dW) X,  dW = P Q  (rank 4, unknown to the learner)
//   model:   H = W0 X + s B (A X)        (only A and B train: r (d + k) numbers, not d k)
#include <lora/core.hpp>

#include <chrono>
#include <cstdio>

int main() {
  using Matrix = Eigen::MatrixXf;
  const int d = 256, k = 192, true_rank = 4, n = 256, steps = 200;

  lora::Rng rng(2024);
  Matrix W0(d, k), P(d, true_rank), Q(true_rank, k);
  lora::fill_normal(W0, rng, 0.0, 1.0 / std::sqrt(double(k)));
  lora::fill_normal(P, rng, 0.0, 0.5);
  lora::fill_normal(Q, rng, 0.0, 1.0 / std::sqrt(double(k)));
  const Matrix W_target = W0 + P * Q;

  lora::LoRAConfig cfg;
  cfg.rank = 4;
  cfg.alpha = 8;
  cfg.seed = 7;
  lora::LoRALinear<float> layer(W0, cfg);  // W0 is copied in and frozen

  // Training buffers, allocated once: the step itself allocates nothing.
  Matrix X(k, n), Y(d, n), H(d, n), G(d, n);
  lora::Workspace<float> ws;
  const float lr = 0.02f;

  std::printf("Learning a hidden rank-%d change of a frozen %d x %d layer with LoRA r = %d\n",
              true_rank, d, k, cfg.rank);
  const auto start = std::chrono::steady_clock::now();
  for (int step = 0; step <= steps; ++step) {
    lora::fill_normal(X, rng, 0.0, 1.0);
    Y.noalias() = W_target * X;
    layer.forward(X, H, ws);
    G = (H - Y) / float(n);  // L = 0.5/n * ||H - Y||^2,  dL/dH = (H - Y) / n
    const double loss = 0.5 * (H - Y).squaredNorm() / n;
    layer.zero_grad();
    layer.backward_without_input_grad(X, G, ws);  // first layer: no dL/dX needed
    layer.A() -= lr * layer.grad_A();
    layer.B() -= lr * layer.grad_B();
    if (step % 25 == 0) std::printf("  step %3d   loss %.3e\n", step, loss);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  const Matrix X_test = Matrix::Random(k, 64);
  const Matrix unmerged = layer.forward(X_test);
  layer.merge();
  const Matrix merged = layer.forward(X_test);  // now a plain dense product
  const double merge_gap = (merged - unmerged).cwiseAbs().maxCoeff();
  const double target_gap = (merged - W_target * X_test).norm() / (W_target * X_test).norm();
  layer.unmerge();

  std::printf("Trained in %.2f s.\n", seconds);
  std::printf("Merged vs unmerged output: max |difference| = %.2e\n", merge_gap);
  std::printf("Relative error against the hidden target: %.2e\n", target_gap);
  std::printf(
      "Parameters: trainable %ld (r (d + k)), frozen %ld (d k): %.2f%% trained\n",
      long(layer.trainable_parameter_count()), long(layer.frozen_parameter_count()),
      100.0 * double(layer.trainable_parameter_count()) / double(layer.frozen_parameter_count()));
  return merge_gap < 1e-4 && target_gap < 1e-2 ? 0 : 1;
}
