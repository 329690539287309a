// Numerical guards: merge/unmerge over many cycles, non-finite values reported and never folded
// into W0, and the extreme shapes (r = min(d, k), an empty batch, a 1 x 1 layer). References are
// computed independently: in double, with the dense weight W0 + s*B*A, or by hand.
#include "test_helpers.hpp"

#include <lora/lora.hpp>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

namespace test_numerical_guards {
namespace {

using Eigen::MatrixXd;
using Eigen::MatrixXf;
using Eigen::VectorXd;

lora::LoRAConfig config(int rank, double alpha = 16.0) {
  lora::LoRAConfig c;
  c.rank = rank;
  c.alpha = alpha;
  return c;
}

/// A float layer on a dense W0 whose storage merges in `mode`.
lora::LoRALinear<float> layer_in(const MatrixXf& W0, const lora::LoRAConfig& cfg,
                                 lora::MergeMode mode) {
  return lora::LoRALinear<float>(lora::DenseFrozenWeight<float>(W0, mode), Eigen::VectorXf(), cfg);
}

MatrixXd random_matrix(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed,
                       double stddev = 1.0) {
  lora::Rng rng(seed);
  MatrixXd m(rows, cols);
  lora::fill_normal(m, rng, 0.0, stddev);
  return m;
}

bool bit_equal(const MatrixXf& a, const MatrixXf& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(float) * static_cast<std::size_t>(a.size())) == 0;
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no exception)";
}

constexpr lora::MergeMode kModes[] = {lora::MergeMode::InPlace, lora::MergeMode::ExactRestore};

// ---- 1,000 merge/unmerge cycles in float --------------------------------------------------------

// A delta three orders of magnitude above W0, rsLoRA scaling and a non-square shape: the regime
// where in-place rounding is largest relative to W0. The bound is the one documented in
// config.hpp: |W - W0| <= c * 2u * (|W0| + |s B A|) after c cycles; ExactRestore is bit-exact.
TEST(MergeCycles, ThousandFloatCyclesLargeDeltaKeepDocumentedBoundAndExactModeIsExact) {
  const int cycles = 1000;
  const MatrixXf W0 = random_matrix(33, 70, 21, 1e-3).cast<float>();
  const MatrixXf B = random_matrix(33, 5, 22).cast<float>();
  const MatrixXf X = random_matrix(70, 4, 23).cast<float>();
  for (lora::MergeMode mode : kModes) {
    auto cfg = config(5, 7.0);
    cfg.use_rslora = true;
    lora::LoRALinear<float> layer = layer_in(W0, cfg, mode);
    layer.B() = B;
    const MatrixXf delta = layer.delta_weight();
    const MatrixXf before = layer.forward(X);
    for (int i = 0; i < cycles; ++i) {
      layer.merge();
      layer.unmerge();
    }
    if (mode == lora::MergeMode::ExactRestore) {
      EXPECT_TRUE(bit_equal(layer.weight(), W0));
      EXPECT_TRUE(bit_equal(layer.forward(X), before));
    } else {
      const float u = std::numeric_limits<float>::epsilon() / 2;
      const MatrixXf bound = cycles * 2 * u * (W0.cwiseAbs() + delta.cwiseAbs());
      EXPECT_TRUE(((layer.weight() - W0).cwiseAbs().array() <= bound.array()).all());
      EXPECT_FALSE(bit_equal(layer.weight(), W0)) << "the bound was never exercised";
    }
  }
}

// ---- non-finite values --------------------------------------------------------------------------

TEST(NonFinite, FreshLayerIsFinite) {
  lora::LoRALinear<double> layer(random_matrix(6, 5, 30), VectorXd::Ones(6), config(2));
  EXPECT_TRUE(layer.all_finite());
  EXPECT_TRUE(layer.adapter().all_finite());
  EXPECT_NO_THROW(layer.check_finite());
}

TEST(NonFinite, NanInTheUpstreamGradientIsReportedInTheGradientsAndNeverReachesW0) {
  const MatrixXd W0 = random_matrix(6, 5, 31);
  lora::LoRALinear<double> layer(W0, config(2));
  layer.B() = random_matrix(6, 2, 32);
  MatrixXd G = random_matrix(6, 3, 33);
  G(4, 1) = std::nan("");
  layer.backward(random_matrix(5, 3, 34), G);
  EXPECT_FALSE(layer.all_finite());
  EXPECT_FALSE(layer.adapter().all_finite());
  const std::string what = message_of([&] { layer.check_finite(); });
  EXPECT_NE(what.find("LoRALinear::check_finite: adapter \"default\": grad_A("), std::string::npos)
      << what;
  EXPECT_NE(what.find("nan"), std::string::npos) << what;

  // A plain SGD step carries the NaN into A and B; merge() then refuses, W0 stays bit for bit.
  layer.A() -= 0.1 * layer.grad_A();
  layer.B() -= 0.1 * layer.grad_B();
  EXPECT_NE(message_of([&] { layer.check_finite(); }).find(": A("), std::string::npos);
  EXPECT_THROW(layer.merge(), std::domain_error);
  EXPECT_FALSE(layer.is_merged());
  EXPECT_TRUE((layer.weight().array() == W0.array()).all());
}

TEST(NonFinite, CheckFiniteNamesTheMatrixTheElementAndTheValue) {
  lora::LoRALinear<double> layer(random_matrix(6, 5, 35), VectorXd::Zero(6), config(2));
  layer.B()(3, 1) = std::numeric_limits<double>::infinity();
  EXPECT_EQ(message_of([&] { layer.check_finite(); }),
            "LoRALinear::check_finite: adapter \"default\": B(3, 1) is inf");
  EXPECT_EQ(message_of([&] { layer.adapter().check_finite(); }),
            "LoRAAdapter::check_finite: B(3, 1) is inf");
  layer.B()(3, 1) = 0;
  layer.grad_B()(0, 1) = -std::numeric_limits<double>::infinity();
  EXPECT_EQ(message_of([&] { layer.check_finite(); }),
            "LoRALinear::check_finite: adapter \"default\": grad_B(0, 1) is -inf");
  layer.zero_grad();

  MatrixXd W0 = random_matrix(6, 5, 36);
  W0(2, 4) = std::nan("");
  lora::LoRALinear<double> bad_base(W0, VectorXd::Zero(6), config(2));
  EXPECT_FALSE(bad_base.all_finite());
  EXPECT_TRUE(bad_base.adapter().all_finite());  // the O(r (d + k)) check looks at the adapter only
  EXPECT_EQ(message_of([&] { bad_base.check_finite(); }),
            "LoRALinear::check_finite: W0(2, 4) is nan");
  VectorXd bias = VectorXd::Zero(6);
  bias(5) = std::nan("");
  lora::LoRALinear<double> bad_bias(random_matrix(6, 5, 37), bias, config(2));
  EXPECT_EQ(message_of([&] { bad_bias.check_finite(); }),
            "LoRALinear::check_finite: bias(5, 0) is nan");
}

// Finite A and B whose sum with W0 overflows float: the infinity would survive unmerge()
// (inf - x = inf) and corrupt W0 for good, so merge() refuses in both modes.
TEST(NonFinite, MergeThatWouldOverflowIsRefusedAndLeavesTheWeightBitExact) {
  MatrixXf W0 = random_matrix(4, 3, 38).cast<float>();
  W0(1, 2) = 3e38f;
  for (lora::MergeMode mode : kModes) {
    lora::LoRALinear<float> layer = layer_in(W0, config(1, 1.0), mode);  // s = 1
    layer.A().setOnes();
    layer.B().setZero();
    layer.B()(1, 0) = 1e38f;  // (s B A)(1, 2) = 1e38: 3e38 + 1e38 > FLT_MAX = 3.4e38
    const std::string what = message_of([&] { layer.merge(); });
    EXPECT_NE(what.find("overflows at (1, 2)"), std::string::npos) << what;
    EXPECT_FALSE(layer.is_merged());
    EXPECT_TRUE(bit_equal(layer.weight(), W0));
    EXPECT_TRUE(layer.all_finite());
  }
}

// Values near the top of float's range that do not overflow take the checked path of InPlace
// mode; the merged weight must still be W0 + s B A, and a NaN already in W0 (the caller's data) is
// neither refused nor spread to other elements.
TEST(NonFinite, MergeNearFloatMaxAndWithANanInW0StaysCorrect) {
  MatrixXf W0 = random_matrix(5, 4, 39).cast<float>();
  W0(0, 0) = 3e38f;
  W0(4, 3) = std::nanf("");
  for (lora::MergeMode mode : kModes) {
    lora::LoRALinear<float> layer = layer_in(W0, config(2, 2.0), mode);
    layer.B() = random_matrix(5, 2, 40).cast<float>();
    const MatrixXd expected = W0.cast<double>() + layer.delta_weight().cast<double>();
    layer.merge();
    for (Eigen::Index j = 0; j < 4; ++j)
      for (Eigen::Index i = 0; i < 5; ++i) {
        if (i == 4 && j == 3) {
          EXPECT_TRUE(std::isnan(layer.weight()(i, j)));
        } else {
          EXPECT_NEAR(layer.weight()(i, j), expected(i, j), 1e-6 * std::abs(expected(i, j)) + 1e-6)
              << i << ", " << j;
        }
      }
    layer.unmerge();
    EXPECT_EQ(layer.weight()(0, 0), 3e38f);
  }
}

// ---- extreme shapes -----------------------------------------------------------------------------

/// Checks forward, backward and merge of `layer` against the dense formulas in double:
///   H = (W0 + s B A) X + b,  dW = G X^T,  dB = s dW A^T,  dA = s B^T dW,  dX = (W0 + s B A)^T G.
void expect_matches_dense(lora::LoRALinear<double>& layer, const MatrixXd& W0, Eigen::Index n) {
  const Eigen::Index d = W0.rows(), k = W0.cols();
  layer.B() = random_matrix(d, layer.rank(), 50);
  const double s = layer.scaling();
  const MatrixXd W = W0 + s * layer.B() * layer.A();
  const MatrixXd X = random_matrix(k, n, 51), G = random_matrix(d, n, 52);
  EXPECT_MATRIX_NEAR(layer.forward(X), W * X, 1e-12);
  layer.zero_grad();
  EXPECT_MATRIX_NEAR(layer.backward(X, G), W.transpose() * G, 1e-12);
  const MatrixXd dW = G * X.transpose();
  EXPECT_MATRIX_NEAR(layer.grad_B(), s * dW * layer.A().transpose(), 1e-12);
  EXPECT_MATRIX_NEAR(layer.grad_A(), s * layer.B().transpose() * dW, 1e-12);
  layer.merge();
  EXPECT_MATRIX_NEAR(layer.weight(), W, 1e-14);
  EXPECT_MATRIX_NEAR(layer.forward(X), W * X, 1e-12);
  layer.unmerge();
}

TEST(ExtremeShapes, FullRankAdapterOnTallWideAndSquareLayers) {
  for (auto [d, k] : {std::pair<int, int>{7, 3}, {3, 7}, {6, 6}}) {
    SCOPED_TRACE(std::to_string(d) + " x " + std::to_string(k));
    const MatrixXd W0 = random_matrix(d, k, 53);
    lora::LoRALinear<double> layer(W0, config(std::min(d, k), 3.0));
    EXPECT_EQ(layer.rank(), std::min(d, k));
    expect_matches_dense(layer, W0, 4);
  }
}

TEST(ExtremeShapes, OneByOneLayerGivesHandComputedNumbers) {
  // W0 = 2, b = 0.5, A = 3, B = -1.5, s = alpha / r = 2, X = [1, -2], G = [1, 1]:
  //   H = 2x + 0.5 + 2 * (-1.5) * 3x = -7x + 0.5           = [-6.5, 14.5]
  //   dB = s G (A X)^T = 2 * (3 - 6)                        = -6
  //   dA = s (B^T G) X^T = 2 * (-1.5) * (1 - 2)             = 3
  //   dX = W0^T G + s A^T B^T G = 2 - 9                     = [-7, -7]
  //   merged W = 2 + 2 * (-1.5) * 3                         = -7
  for (lora::MergeMode mode : kModes) {
    lora::LoRALinear<double> layer(
        lora::DenseFrozenWeight<double>(MatrixXd::Constant(1, 1, 2.0), mode),
        VectorXd::Constant(1, 0.5), config(1, 2.0));
    layer.set_adapter_weights(MatrixXd::Constant(1, 1, 3.0), MatrixXd::Constant(1, 1, -1.5));
    MatrixXd X(1, 2), G(1, 2), H(1, 2), dX(1, 2);
    X << 1, -2;
    G << 1, 1;
    H << -6.5, 14.5;
    dX << -7, -7;
    EXPECT_MATRIX_NEAR(layer.forward(X), H, 1e-15);
    EXPECT_MATRIX_NEAR(layer.backward(X, G), dX, 1e-15);
    EXPECT_EQ(layer.grad_B()(0, 0), -6.0);
    EXPECT_EQ(layer.grad_A()(0, 0), 3.0);
    layer.merge();
    EXPECT_EQ(layer.weight()(0, 0), -7.0);
    EXPECT_MATRIX_NEAR(layer.forward(X), H, 1e-15);
    layer.unmerge();
    EXPECT_EQ(layer.weight()(0, 0), 2.0);
  }
}

TEST(ExtremeShapes, EmptyBatchThroughEveryOverloadLeavesGradientsUnchanged) {
  lora::LoRALinear<double> layer(random_matrix(5, 3, 54), VectorXd::Ones(5), config(3));
  layer.B() = random_matrix(5, 3, 55);
  layer.backward(random_matrix(3, 2, 56), random_matrix(5, 2, 57));  // non-zero gradients first
  const MatrixXd gA = layer.grad_A(), gB = layer.grad_B();
  lora::Workspace<double> ws;
  const MatrixXd X(3, 0), G(5, 0);
  MatrixXd H(5, 0), dX(3, 0);
  layer.forward(X, H, ws);
  layer.backward(X, G, dX, ws);
  layer.backward_without_input_grad(X, G, ws);
  layer.backward_without_input_grad(X, G);
  EXPECT_EQ(layer.forward(X).cols(), 0);
  EXPECT_EQ(layer.backward(X, G).rows(), 3);
  EXPECT_TRUE((layer.grad_A().array() == gA.array()).all());
  EXPECT_TRUE((layer.grad_B().array() == gB.array()).all());
  layer.merge();
  EXPECT_EQ(layer.forward(X).rows(), 5);
  EXPECT_THROW(layer.forward(MatrixXd(2, 0)), std::invalid_argument);  // rows still checked
}

}  // namespace
}  // namespace test_numerical_guards

namespace test_numerical_guards {
namespace {

// MultiLoRALinear::set_active while merged: a new adapter whose merge overflows is refused and the
// old one stays merged (the weight is W0 + the old delta again).
TEST(NonFinite, SwitchingToAnAdapterWhoseMergeOverflowsChangesNothing) {
  MatrixXf W0 = MatrixXf::Ones(3, 2);
  W0(0, 1) = 3e38f;
  lora::MultiLoRALinear<float> layer(W0);
  lora::LoRAAdapter<float> good(3, 2, config(1, 1.0)), bad(3, 2, config(1, 1.0));
  good.A().setConstant(0.5f);
  good.B().setConstant(2.0f);  // delta = 1 everywhere
  bad.A().setOnes();
  bad.B().setConstant(1e38f);  // (0, 1): 3e38 + 1e38 overflows float
  layer.add_adapter("good", good);
  layer.add_adapter("bad", bad);
  layer.set_active("good");
  layer.merge();
  const MatrixXf merged = layer.weight();
  EXPECT_THROW(layer.set_active("bad"), std::domain_error);
  EXPECT_EQ(layer.active_name(), "good");
  EXPECT_TRUE(layer.is_merged());
  EXPECT_TRUE((layer.weight().array() == merged.array()).all());
}

}  // namespace
}  // namespace test_numerical_guards
