// Optimizers: SGD and AdamW against scalar loops written from PyTorch's documented update rules
// and against values printed by torch 1.13 itself; clipping by global norm; frozen weights never
// change; option and parameter validation; step() allocates nothing.

// Eigen's allocation guard, made to throw in release builds too (this file only): once
// set_is_malloc_allowed(false) is called, any heap allocation by Eigen throws.
#include <stdexcept>
#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x) \
  if (!(x)) throw std::runtime_error("Eigen assertion failed: " #x)

#include "test_helpers.hpp"

#include <lora/lora.hpp>
#include <lora/optim.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace test_optim {
namespace {

using Matrix = Eigen::MatrixXd;

// The parameter every test starts from (3 x 2) and the gradient fed at step t, independent of p:
// g_t(r, c) = cos(0.7 (r + 3c) + 1.3 t). tests/ref_optim.py below uses the same numbers.
Matrix start_value() {
  Matrix p(3, 2);
  p << 0.5, -1.25, 2.0, 0.125, -0.75, 1.5;
  return p;
}
double grad_at(int r, int c, int t) {
  return std::cos(0.7 * (r + 3 * c) + 1.3 * t);
}
void set_grad(Matrix& g, int t) {
  for (int c = 0; c < g.cols(); ++c)
    for (int r = 0; r < g.rows(); ++r) g(r, c) = grad_at(r, c, t);
}

// Reference: torch.optim.SGD's loop, one scalar at a time (dampening 0).
Matrix sgd_reference(const lora::SGDOptions& o, int steps) {
  Matrix p = start_value(), buf = Matrix::Zero(3, 2);
  for (int t = 0; t < steps; ++t)
    for (int c = 0; c < 2; ++c)
      for (int r = 0; r < 3; ++r) {
        double d = grad_at(r, c, t) + o.weight_decay * p(r, c);
        if (o.momentum != 0) {
          buf(r, c) = t == 0 ? d : o.momentum * buf(r, c) + d;
          d = o.nesterov ? d + o.momentum * buf(r, c) : buf(r, c);
        }
        p(r, c) -= o.lr * d;
      }
  return p;
}

// Reference: torch.optim.AdamW's loop (amsgrad off), one scalar at a time.
Matrix adamw_reference(const lora::AdamWOptions& o, int steps) {
  Matrix p = start_value(), m = Matrix::Zero(3, 2), v = Matrix::Zero(3, 2);
  for (int t = 1; t <= steps; ++t)
    for (int c = 0; c < 2; ++c)
      for (int r = 0; r < 3; ++r) {
        const double g = grad_at(r, c, t - 1);
        p(r, c) *= 1 - o.lr * o.weight_decay;
        m(r, c) = o.beta1 * m(r, c) + (1 - o.beta1) * g;
        v(r, c) = o.beta2 * v(r, c) + (1 - o.beta2) * g * g;
        const double m_hat = m(r, c) / (1 - std::pow(o.beta1, t));
        const double v_hat = v(r, c) / (1 - std::pow(o.beta2, t));
        p(r, c) -= o.lr * m_hat / (std::sqrt(v_hat) + o.eps);
      }
  return p;
}

template <typename Opt, typename Options>
Matrix run(const Options& options, int steps) {
  Matrix p = start_value(), g(3, 2);
  Opt opt({lora::make_parameter(p, g)}, options);
  for (int t = 0; t < steps; ++t) {
    set_grad(g, t);
    opt.step();
  }
  return p;
}

Matrix column_major(std::initializer_list<double> v) {
  Matrix m(3, 2);
  std::copy(v.begin(), v.end(), m.data());
  return m;
}

TEST(SGD, PlainStepIsPMinusLrG) {
  lora::SGDOptions o;
  o.lr = 0.25;
  Matrix p = start_value(), g(3, 2);
  set_grad(g, 0);
  lora::SGD<double> opt({lora::make_parameter(p, g)}, o);
  opt.step();
  // One step by hand: p - 0.25 g.
  EXPECT_MATRIX_NEAR(p, (start_value() - 0.25 * g).eval(), 1e-15);
  EXPECT_MATRIX_NEAR(run<lora::SGD<double>>(o, 3), sgd_reference(o, 3), 1e-14);
}

TEST(SGD, MomentumAndWeightDecayMatchThePyTorchLoop) {
  const lora::SGDOptions o{/*lr=*/0.1, /*momentum=*/0.9, /*weight_decay=*/0.05, /*nesterov=*/false};
  EXPECT_MATRIX_NEAR(run<lora::SGD<double>>(o, 5), sgd_reference(o, 5), 1e-14);
  // torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.05), 4 steps, float64 (tests/ref_optim.py
  // run with /usr/bin/python3, torch 1.13), printed column-major:
  const Matrix torch_p = column_major({0.3011397647159815, 1.960941794250975, -0.46229554741126083,
                                       -0.8560320747704174, 0.3821509793763407, 1.49675225827245});
  EXPECT_MATRIX_NEAR(run<lora::SGD<double>>(o, 4), torch_p, 1e-14);
}

TEST(SGD, NesterovMatchesThePyTorchLoop) {
  const lora::SGDOptions o{/*lr=*/0.1, /*momentum=*/0.9, /*weight_decay=*/0.05, /*nesterov=*/true};
  EXPECT_MATRIX_NEAR(run<lora::SGD<double>>(o, 5), sgd_reference(o, 5), 1e-14);
  // torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.05, nesterov=True), 4 steps (as above):
  const Matrix torch_p =
      column_major({0.3486666575846402, 2.0029164445100758, -0.39608340469123, -0.8251192393220287,
                    0.34396170891373884, 1.4065419952718707});
  EXPECT_MATRIX_NEAR(run<lora::SGD<double>>(o, 4), torch_p, 1e-14);
}

TEST(SGD, DoesNotChangeTheGradient) {
  Matrix p = start_value(), g(3, 2);
  set_grad(g, 0);
  const Matrix g0 = g;
  lora::SGD<double> opt({lora::make_parameter(p, g)}, {0.1, 0.9, 0.1, true});
  opt.step();
  EXPECT_EQ(g, g0);
  opt.zero_grad();
  EXPECT_EQ(g, Matrix::Zero(3, 2));
}

TEST(AdamW, MatchesThePyTorchLoop) {
  lora::AdamWOptions o;
  o.lr = 0.01;
  o.beta1 = 0.8;
  o.beta2 = 0.95;
  o.eps = 1e-3;
  o.weight_decay = 0.1;
  EXPECT_MATRIX_NEAR(run<lora::AdamW<double>>(o, 7), adamw_reference(o, 7), 1e-14);
  // torch.optim.AdamW(lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1), 5 steps, float64
  // (tests/ref_optim.py run with /usr/bin/python3, torch 1.13), printed column-major:
  const Matrix torch_p =
      column_major({0.4831276091846454, 1.9854889091391035, -0.7417757470415133,
                    -1.2196781913709753, 0.1423963446938337, 1.5023074618238956});
  EXPECT_MATRIX_NEAR(run<lora::AdamW<double>>(o, 5), torch_p, 1e-14);
}

TEST(AdamW, FirstStepMovesEachCoordinateByAboutLr) {
  // With bias correction, m_hat = g and v_hat = g^2 at t = 1: the step is lr * g / (|g| + eps).
  lora::AdamWOptions o;
  o.lr = 0.01;
  o.weight_decay = 0;
  o.eps = 0;
  Matrix p = start_value(), g(3, 2);
  set_grad(g, 0);
  lora::AdamW<double> opt({lora::make_parameter(p, g)}, o);
  opt.step();
  const Matrix expected = start_value() - 0.01 * g.cwiseSign();
  EXPECT_MATRIX_NEAR(p, expected, 1e-15);
  EXPECT_EQ(opt.step_count(), 1);
}

TEST(AdamW, FloatFollowsTheDoubleReference) {
  lora::AdamWOptions o;
  o.lr = 0.05;
  Eigen::MatrixXf p = start_value().cast<float>(), g(3, 2);
  lora::AdamW<float> opt({lora::make_parameter(p, g)}, o);
  for (int t = 0; t < 6; ++t) {
    Matrix gd(3, 2);
    set_grad(gd, t);
    g = gd.cast<float>();
    opt.step();
  }
  EXPECT_MATRIX_NEAR(p, adamw_reference(o, 6), 1e-5);
}

TEST(AdamW, LearningRateCanBeScheduled) {
  lora::AdamWOptions o;
  o.weight_decay = 0;
  Matrix p = start_value(), g(3, 2);
  set_grad(g, 0);
  lora::AdamW<double> opt({lora::make_parameter(p, g)}, o);
  opt.set_learning_rate(0);
  opt.step();
  EXPECT_EQ(p, start_value());  // lr = 0: nothing moves (the moments still advance)
  EXPECT_EQ(opt.learning_rate(), 0.0);
  EXPECT_THROW(opt.set_learning_rate(-1), std::invalid_argument);
  EXPECT_THROW(opt.set_learning_rate(NAN), std::invalid_argument);
  EXPECT_EQ(opt.learning_rate(), 0.0);  // a rejected value leaves the old one
}

TEST(Parameters, VectorOverloadTrainsABias) {
  Eigen::VectorXd b(3), gb(3);
  b << 1, 2, 3;
  gb << 1, -1, 0.5;
  lora::SGD<double> opt({lora::make_parameter(b, gb)}, {0.5, 0, 0, false});
  opt.step();
  EXPECT_EQ(b, Eigen::Vector3d(0.5, 2.5, 2.75));
}

TEST(Parameters, ShapeMismatchAndRepeatsAreRejected) {
  Matrix p(3, 2), g(2, 3), g_ok(3, 2);
  EXPECT_THROW(lora::make_parameter(p, g), std::invalid_argument);
  Eigen::VectorXd v(3), gv(4);
  EXPECT_THROW(lora::make_parameter(v, gv), std::invalid_argument);
  EXPECT_THROW(lora::make_parameter(p, p), std::invalid_argument);
  const auto view = lora::make_parameter(p, g_ok);
  EXPECT_THROW(lora::SGD<double>({view, view}), std::invalid_argument);
  EXPECT_THROW(lora::AdamW<double>({view, view}), std::invalid_argument);
  try {
    lora::make_parameter(p, g);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("3 x 2"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("2 x 3"), std::string::npos) << e.what();
  }
}

TEST(Options, InvalidValuesThrowWithTheirName) {
  Matrix p(1, 1), g(1, 1);
  const std::vector<lora::ParameterView<double>> params{lora::make_parameter(p, g)};
  auto sgd_throws = [&](lora::SGDOptions o, const char* name) {
    try {
      lora::SGD<double> opt(params, o);
      ADD_FAILURE() << "no throw for " << name;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
  };
  sgd_throws({-0.1, 0, 0, false}, "lr");
  sgd_throws({INFINITY, 0, 0, false}, "lr");
  sgd_throws({0.1, 1.0, 0, false}, "momentum");
  sgd_throws({0.1, -0.5, 0, false}, "momentum");
  sgd_throws({0.1, 0, -1, false}, "weight_decay");
  sgd_throws({0.1, 0, 0, true}, "nesterov");
  auto adamw_throws = [&](lora::AdamWOptions o, const char* name) {
    try {
      lora::AdamW<double> opt(params, o);
      ADD_FAILURE() << "no throw for " << name;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
  };
  adamw_throws({-1e-3, 0.9, 0.999, 1e-8, 0}, "lr");
  adamw_throws({1e-3, 1.0, 0.999, 1e-8, 0}, "beta1");
  adamw_throws({1e-3, 0.9, -0.1, 1e-8, 0}, "beta2");
  adamw_throws({1e-3, 0.9, 0.999, NAN, 0}, "eps");
  adamw_throws({1e-3, 0.9, 0.999, 1e-8, -1}, "weight_decay");
}

TEST(Optimizers, StepAllocatesNothing) {
  Matrix a = start_value(), ga(3, 2), b(4, 1), gb(4, 1);
  set_grad(ga, 0);
  gb.setConstant(0.5);
  const std::vector<lora::ParameterView<double>> params{lora::make_parameter(a, ga),
                                                        lora::make_parameter(b, gb)};
  lora::SGD<double> sgd(params, {0.1, 0.9, 0.01, true});
  lora::AdamW<double> adamw(params);
  Eigen::internal::set_is_malloc_allowed(false);
  EXPECT_NO_THROW({
    for (int i = 0; i < 3; ++i) {
      sgd.step();
      adamw.step();
      lora::clip_grad_norm(params, 0.1);
    }
  });
  Eigen::internal::set_is_malloc_allowed(true);
  Matrix must_allocate;  // the guard itself works: an allocation throws while it is on
  Eigen::internal::set_is_malloc_allowed(false);
  EXPECT_THROW(must_allocate.resize(10, 10), std::runtime_error);
  Eigen::internal::set_is_malloc_allowed(true);
}

TEST(ClipGradNorm, ScalesAllGradientsByOneFactor) {
  Matrix a(1, 2), ga(1, 2), b(1, 1), gb(1, 1);
  ga << 3, 4;
  gb << 12;  // global norm sqrt(9 + 16 + 144) = 13
  const std::vector<lora::ParameterView<double>> params{lora::make_parameter(a, ga),
                                                        lora::make_parameter(b, gb)};
  EXPECT_EQ(lora::clip_grad_norm(params, 20.0), 13.0);  // below the limit: untouched
  EXPECT_EQ(ga(0, 1), 4.0);
  EXPECT_EQ(lora::clip_grad_norm(params, 6.5), 13.0);
  const double f = 6.5 / (13.0 + 1e-6);  // torch's clip_coef
  EXPECT_DOUBLE_EQ(ga(0, 0), 3 * f);
  EXPECT_DOUBLE_EQ(ga(0, 1), 4 * f);
  EXPECT_DOUBLE_EQ(gb(0, 0), 12 * f);
  EXPECT_NEAR(std::sqrt(ga.squaredNorm() + gb.squaredNorm()), 6.5, 1e-6);
}

TEST(ClipGradNorm, NonFiniteNormThrowsAndLeavesGradients) {
  Matrix a(1, 2), ga(1, 2);
  ga << 3, NAN;
  const std::vector<lora::ParameterView<double>> params{lora::make_parameter(a, ga)};
  EXPECT_THROW(lora::clip_grad_norm(params, 1.0), std::domain_error);
  EXPECT_EQ(ga(0, 0), 3.0);
  EXPECT_THROW(lora::clip_grad_norm(params, -1.0), std::invalid_argument);
}

// Trains a layer's adapter with AdamW and SGD: W0 and the bias are bit-identical afterwards, the
// adapter did move, and no optimizer state exists for anything but A and B.
template <typename Opt, typename Options>
void frozen_weights_stay_bit_identical(const Options& options) {
  lora::Rng rng(5);
  Eigen::MatrixXf W0(6, 5), X(5, 8), Y(6, 8);
  Eigen::VectorXf bias(6);
  lora::fill_normal(W0, rng, 0, 1);
  lora::fill_normal(bias, rng, 0, 1);
  lora::fill_normal(X, rng, 0, 1);
  lora::fill_normal(Y, rng, 0, 1);
  lora::LoRAConfig cfg;
  cfg.rank = 2;
  lora::LoRALinear<float> layer(W0, bias, cfg);
  const Eigen::MatrixXf A0 = layer.A();
  auto params = lora::adapter_parameters(layer);
  ASSERT_EQ(params.size(), 2u);
  EXPECT_EQ(params[0].value.data(), layer.A().data());
  EXPECT_EQ(params[1].grad.data(), layer.grad_B().data());
  EXPECT_EQ(lora::parameter_count(params), layer.trainable_parameter_count());
  Opt opt(params, options);
  for (int step = 0; step < 20; ++step) {
    opt.zero_grad();
    const Eigen::MatrixXf H = layer.forward(X);
    layer.backward(X, (H - Y) / 8.0f);
    opt.step();
  }
  EXPECT_EQ(std::memcmp(layer.weight().data(), W0.data(), sizeof(float) * W0.size()), 0);
  EXPECT_EQ(std::memcmp(layer.bias().data(), bias.data(), sizeof(float) * bias.size()), 0);
  EXPECT_NE(layer.A(), A0);
  EXPECT_NE(layer.B(), Eigen::MatrixXf::Zero(6, 2));
}

TEST(Frozen, AdamWLeavesW0BitIdentical) {
  lora::AdamWOptions o;
  o.lr = 0.01;
  frozen_weights_stay_bit_identical<lora::AdamW<float>>(o);
}

TEST(Frozen, SGDLeavesW0BitIdentical) {
  frozen_weights_stay_bit_identical<lora::SGD<float>>(lora::SGDOptions{0.05, 0.9, 0.01, true});
}

// Views taken and stepped while merged are safe: unmerge removes exactly what merge added.
TEST(Frozen, StepsOnAMergedLayerNeverReachW0) {
  lora::LoRAConfig cfg;
  cfg.rank = 2;
  const Matrix W0 = Matrix::Identity(4, 4);
  lora::LoRALinear<double> layer(lora::DenseFrozenWeight<double>(W0, lora::MergeMode::ExactRestore),
                                 Eigen::VectorXd(), cfg);
  layer.merge();
  auto params = lora::adapter_parameters(layer);
  layer.grad_A().setOnes();
  layer.grad_B().setOnes();
  lora::SGD<double> opt(params, {0.5});
  opt.step();
  layer.unmerge();
  EXPECT_TRUE(layer.weight() == W0);
  EXPECT_TRUE((layer.B().array() == -0.5).all());
}

}  // namespace
}  // namespace test_optim
