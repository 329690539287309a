// LoRA dropout (PEFT's lora_dropout): mask statistics, reproducibility, eval-mode identity, the
// forward against a plain dense formula, and finite-difference gradients with the layer's mask.

// Eigen's allocation guard, made to throw in release builds too (this file only).
#include <stdexcept>
#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x) \
  if (!(x)) throw std::runtime_error("Eigen assertion failed: " #x)

#include "test_helpers.hpp"

#include <lora/lora.hpp>

#include <gtest/gtest.h>

#include <cmath>

namespace test_dropout {
namespace {

using Matrix = Eigen::MatrixXd;
using Vector = Eigen::VectorXd;

struct Problem {
  Matrix W0, X, B, C;
  Vector bias;
};

// A d x k layer with a non-zero B (so the adapter path matters) and an input of n columns.
Problem make_problem(int d, int k, int r, int n, std::uint64_t seed = 3) {
  lora::Rng rng(seed);
  Problem p{Matrix(d, k), Matrix(k, n), Matrix(d, r), Matrix(d, n), Vector(d)};
  lora::fill_normal(p.W0, rng, 0, 1);
  lora::fill_normal(p.X, rng, 0, 1);
  lora::fill_normal(p.B, rng, 0, 1);
  lora::fill_normal(p.C, rng, 0, 1);
  lora::fill_normal(p.bias, rng, 0, 1);
  return p;
}

lora::LoRAConfig config(int r, double dropout, std::uint64_t seed = 11) {
  lora::LoRAConfig cfg;
  cfg.rank = r;
  cfg.alpha = 3;
  cfg.dropout = dropout;
  cfg.seed = seed;
  return cfg;
}

TEST(Dropout, ConfigRejectsProbabilitiesOutsideZeroOne) {
  for (double p : {-0.1, 1.0, 1.5, double(NAN)}) {
    EXPECT_THROW(config(2, p).validate(), std::invalid_argument) << p;
    EXPECT_THROW(lora::LoRALinear<double>(Matrix::Ones(4, 4), config(2, p)), std::invalid_argument)
        << p;
  }
  EXPECT_NO_THROW(config(2, 0.0).validate());
  EXPECT_NO_THROW(config(2, 0.999).validate());
}

TEST(Dropout, ModeSwitch) {
  lora::LoRALinear<double> layer(Matrix::Ones(4, 4), config(2, 0.5));
  EXPECT_TRUE(layer.is_training());  // as a torch.nn.Module
  EXPECT_TRUE(layer.dropout_active());
  layer.eval();
  EXPECT_FALSE(layer.is_training());
  EXPECT_FALSE(layer.dropout_active());
  layer.train();
  EXPECT_TRUE(layer.is_training());
  layer.train(false);
  EXPECT_FALSE(layer.is_training());
  lora::LoRALinear<double> no_dropout(Matrix::Ones(4, 4), config(2, 0.0));
  EXPECT_FALSE(no_dropout.dropout_active());
}

TEST(Dropout, MaskStatistics) {
  const double p = 0.3;
  const int k = 64, n = 500;
  const Problem pr = make_problem(8, k, 4, n);
  lora::LoRALinear<float> layer(pr.W0.cast<float>(), config(4, p));
  layer.forward(pr.X.cast<float>());
  const Eigen::MatrixXf M = layer.dropout_mask();
  ASSERT_EQ(M.rows(), k);
  ASSERT_EQ(M.cols(), n);
  const float keep = static_cast<float>(1.0 / (1.0 - p));
  long zeros = 0;
  for (Eigen::Index i = 0; i < M.size(); ++i) {
    ASSERT_TRUE(M.data()[i] == 0.0f || M.data()[i] == keep) << M.data()[i];
    zeros += M.data()[i] == 0.0f;
  }
  // The dropped fraction is Binomial(N, p) / N: within 5 standard deviations of p.
  const double N = double(M.size()), sigma = std::sqrt(p * (1 - p) / N);
  EXPECT_NEAR(zeros / N, p, 5 * sigma);
  // Inverted dropout keeps the expectation: mean(M) ~ 1.
  EXPECT_NEAR(M.cast<double>().mean(), 1.0, 5 * sigma / (1 - p));
  // Each column and each feature is masked independently: no row or column is all kept or all
  // dropped, and rows are not copies of each other.
  EXPECT_NE(M.row(0), M.row(1));
  EXPECT_NE(M.col(0), M.col(1));
  // A second forward draws a fresh mask.
  layer.forward(pr.X.cast<float>());
  EXPECT_NE(Eigen::MatrixXf(layer.dropout_mask()), M);
}

TEST(Dropout, MasksAreReproducible) {
  const Problem pr = make_problem(6, 5, 2, 7);
  lora::LoRALinear<double> a(pr.W0, config(2, 0.5, 42)), b(pr.W0, config(2, 0.5, 42));
  a.forward(pr.X);
  b.forward(pr.X);
  EXPECT_EQ(Matrix(a.dropout_mask()), Matrix(b.dropout_mask()));  // same seed, same masks
  lora::LoRALinear<double> c(pr.W0, config(2, 0.5, 43));
  c.forward(pr.X);
  EXPECT_NE(Matrix(a.dropout_mask()), Matrix(c.dropout_mask()));
  // seed_dropout restarts the stream.
  a.seed_dropout(9);
  c.seed_dropout(9);
  a.forward(pr.X);
  c.forward(pr.X);
  EXPECT_EQ(Matrix(a.dropout_mask()), Matrix(c.dropout_mask()));
}

TEST(Dropout, EvalModeAndZeroProbabilityAreThePlainPath) {
  const Problem pr = make_problem(6, 5, 2, 7);
  lora::LoRALinear<double> plain(pr.W0, pr.bias, config(2, 0.0));
  lora::LoRALinear<double> dropping(pr.W0, pr.bias, config(2, 0.5));
  plain.B() = pr.B;
  dropping.B() = pr.B;
  ASSERT_EQ(plain.A(), dropping.A());  // dropout does not change A's draw
  const Matrix reference = plain.forward(pr.X);
  // The dense formula, independently: W0 X + b + s B A X.
  const Matrix dense =
      (pr.W0 * pr.X).colwise() + pr.bias + plain.scaling() * pr.B * (plain.A() * pr.X);
  EXPECT_MATRIX_NEAR(reference, dense, 1e-13);
  // Training with p = 0, and eval with p = 0.5: bit-identical to the plain path, every time.
  EXPECT_EQ(plain.forward(pr.X), reference);
  dropping.eval();
  EXPECT_EQ(dropping.forward(pr.X), reference);
  EXPECT_EQ(dropping.forward(pr.X), reference);
  EXPECT_EQ(dropping.dropout_mask().size(), 0);  // no mask was drawn in eval mode
  // The gradients too.
  const Matrix dX_plain = plain.backward(pr.X, pr.C);
  EXPECT_EQ(dropping.backward(pr.X, pr.C), dX_plain);
  EXPECT_EQ(dropping.grad_A(), plain.grad_A());
  EXPECT_EQ(dropping.grad_B(), plain.grad_B());
  // Training mode with dropout differs.
  dropping.train();
  EXPECT_NE(dropping.forward(pr.X), reference);
}

TEST(Dropout, ForwardMatchesTheDenseFormulaWithItsMask) {
  const Problem pr = make_problem(6, 5, 2, 9);
  lora::LoRALinear<double> layer(pr.W0, pr.bias, config(2, 0.4));
  layer.B() = pr.B;
  const Matrix H = layer.forward(pr.X);
  const Matrix M = layer.dropout_mask();
  const Matrix dense = (pr.W0 * pr.X).colwise() + pr.bias +
                       layer.scaling() * pr.B * (layer.A() * pr.X.cwiseProduct(M));
  EXPECT_MATRIX_NEAR(H, dense, 1e-13);
  EXPECT_GT((M.array() == 0).count(), 0);  // the check would be vacuous without a dropped element
}

// L = sum(C .* H) + 0.5 ||H||^2 so that G = dL/dH = C + H. The reference is written out densely
// with the mask the layer drew, then differentiated by central differences in A, B and X.
TEST(Dropout, GradientsMatchFiniteDifferencesWithTheForwardMask) {
  const int d = 5, k = 4, r = 2, n = 6;
  Problem pr = make_problem(d, k, r, n);
  lora::LoRALinear<double> layer(pr.W0, pr.bias, config(r, 0.5));
  layer.B() = pr.B;
  Matrix A = layer.A(), B = pr.B, X = pr.X;
  const Matrix H = layer.forward(X);
  const Matrix M = layer.dropout_mask();
  ASSERT_GT((M.array() == 0).count(), 0);
  const double s = layer.scaling();
  auto loss = [&]() {
    const Matrix Hd = (pr.W0 * X).colwise() + pr.bias + s * B * (A * X.cwiseProduct(M));
    return (pr.C.cwiseProduct(Hd)).sum() + 0.5 * Hd.squaredNorm();
  };
  const Matrix G = pr.C + H;
  layer.zero_grad();
  const Matrix dX = layer.backward(X, G);
  EXPECT_MATRIX_NEAR(layer.grad_A(), lora::test::numeric_gradient(A, loss), 1e-7);
  EXPECT_MATRIX_NEAR(layer.grad_B(), lora::test::numeric_gradient(B, loss), 1e-7);
  EXPECT_MATRIX_NEAR(dX, lora::test::numeric_gradient(X, loss), 1e-7);
  // backward uses the forward's mask: it draws nothing, so a second backward gives the same.
  const Matrix gA = layer.grad_A();
  layer.zero_grad();
  layer.backward_without_input_grad(X, G);
  EXPECT_EQ(layer.grad_A(), gA);
  EXPECT_EQ(Matrix(layer.dropout_mask()), M);
}

TEST(Dropout, BackwardWithoutAMatchingForwardThrows) {
  const Problem pr = make_problem(6, 5, 2, 7);
  lora::LoRALinear<double> layer(pr.W0, config(2, 0.5));
  EXPECT_THROW(layer.backward(pr.X, pr.C), std::logic_error);  // no forward yet
  EXPECT_THROW(layer.backward_without_input_grad(pr.X, pr.C), std::logic_error);
  layer.forward(pr.X.leftCols(3));
  EXPECT_THROW(layer.backward(pr.X, pr.C), std::logic_error);  // mask of another batch size
  layer.forward(pr.X);
  EXPECT_NO_THROW(layer.backward(pr.X, pr.C));
}

TEST(Dropout, TrainingStepAllocatesNothingOnceGrown) {
  const Problem pr = make_problem(6, 5, 2, 7);
  lora::LoRALinear<double> layer(pr.W0, pr.bias, config(2, 0.25));
  lora::Workspace<double> ws;
  Matrix H(6, 7), dX(5, 7);
  layer.forward(pr.X, H, ws);
  layer.backward(pr.X, pr.C, dX, ws);
  Eigen::internal::set_is_malloc_allowed(false);
  EXPECT_NO_THROW({
    for (int i = 0; i < 3; ++i) {
      layer.forward(pr.X, H, ws);
      layer.backward(pr.X, pr.C, dX, ws);
      layer.forward(pr.X.leftCols(4), H.leftCols(4), ws);  // a smaller batch reuses the storage
      layer.backward(pr.X.leftCols(4), pr.C.leftCols(4), dX.leftCols(4), ws);
    }
  });
  Eigen::internal::set_is_malloc_allowed(true);
}

}  // namespace
}  // namespace test_dropout
