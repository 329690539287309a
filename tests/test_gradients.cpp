// dA, dB and dX checked against central finite differences of a real loss,
//   L = 0.5 * || W0 X + b + s B A X - Y ||^2,   G = dL/dH = H - Y,
// on several shapes, including rank 1, a single sample and non-square layers.
#include "test_helpers.hpp"

#include <lora/lora.hpp>

namespace test_gradients {
namespace {

using Eigen::MatrixXd;
using Eigen::VectorXd;
using lora::test::numeric_gradient;

struct Shape {
  int d, k, r, n;
  bool bias;
  bool rslora;
};

class GradientCheck : public ::testing::TestWithParam<Shape> {};

TEST_P(GradientCheck, MatchesFiniteDifferences) {
  const Shape s = GetParam();
  lora::Rng rng(1234 + s.d * 31 + s.k);
  MatrixXd W0(s.d, s.k), X(s.k, s.n), Y(s.d, s.n), A(s.r, s.k), B(s.d, s.r);
  VectorXd b(s.bias ? s.d : 0);
  for (auto* m : {&W0, &X, &Y, &A, &B}) lora::fill_normal(*m, rng, 0.0, 1.0);
  lora::fill_normal(b, rng, 0.0, 1.0);

  lora::LoRAConfig cfg;
  cfg.rank = s.r;
  cfg.alpha = 3.0;
  cfg.use_rslora = s.rslora;
  lora::LoRALinear<double> layer(W0, b, cfg);
  layer.set_adapter_weights(A, B);

  // The loss as a function of (A, B, X), evaluated by a plain dense computation of H that does
  // not go through the layer: an independent reference.
  const double scale = s.rslora ? 3.0 / std::sqrt(double(s.r)) : 3.0 / s.r;
  auto loss = [&] {
    MatrixXd H = W0 * X + scale * B * (A * X);
    if (s.bias) H.colwise() += b;
    return 0.5 * (H - Y).squaredNorm();
  };
  const MatrixXd G = layer.forward(X) - Y;
  const MatrixXd dX = layer.backward(X, G);

  const double tol = 1e-7;
  EXPECT_MATRIX_NEAR(layer.grad_A(), numeric_gradient(A, loss), tol);
  EXPECT_MATRIX_NEAR(layer.grad_B(), numeric_gradient(B, loss), tol);
  EXPECT_MATRIX_NEAR(dX, numeric_gradient(X, loss), tol);

  // Gradients accumulate: a second backward adds the same amount again.
  const MatrixXd dA1 = layer.grad_A();
  layer.backward(X, G);
  EXPECT_MATRIX_NEAR(layer.grad_A(), (2 * dA1).eval(), 1e-14);

  // Skipping dX gives the same parameter gradients.
  layer.zero_grad();
  EXPECT_EQ(layer.grad_A().norm(), 0.0);
  layer.backward_without_input_grad(X, G);
  EXPECT_MATRIX_NEAR(layer.grad_A(), dA1, 1e-14);
}

INSTANTIATE_TEST_SUITE_P(Shapes, GradientCheck,
                         ::testing::Values(Shape{7, 5, 2, 3, false, false},
                                           Shape{5, 9, 1, 1, true, false},   // rank 1, one sample
                                           Shape{4, 4, 4, 6, false, true},   // r = min(d, k)
                                           Shape{12, 3, 3, 2, true, true},   // tall
                                           Shape{1, 6, 1, 4, false, false},  // one output
                                           Shape{3, 20, 2, 5, true, false}   // wide
                                           ));

// Float gradients agree with the double ones to float precision.
TEST(GradientCheckFloat, FloatMatchesDouble) {
  lora::Rng rng(7);
  MatrixXd W0(9, 6), X(6, 4), G(9, 4), A(3, 6), B(9, 3);
  for (auto* m : {&W0, &X, &G, &A, &B}) lora::fill_normal(*m, rng, 0.0, 1.0);
  lora::LoRAConfig cfg;
  cfg.rank = 3;
  lora::LoRALinear<double> ld(W0, cfg);
  lora::LoRALinear<float> lf(W0.cast<float>(), cfg);
  ld.set_adapter_weights(A, B);
  lf.set_adapter_weights(A.cast<float>(), B.cast<float>());
  const MatrixXd dXd = ld.backward(X, G);
  const Eigen::MatrixXf dXf = lf.backward(X.cast<float>(), G.cast<float>());
  EXPECT_MATRIX_NEAR(dXf, dXd, 1e-5);
  EXPECT_MATRIX_NEAR(lf.grad_A(), ld.grad_A(), 1e-5);
  EXPECT_MATRIX_NEAR(lf.grad_B(), ld.grad_B(), 1e-5);
}

}  // namespace
}  // namespace test_gradients
