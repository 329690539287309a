// LoRALinear behaviour: initialisation, the allocation-free API, merge/unmerge and every error
// path.
#include "test_helpers.hpp"

#include <lora/lora.hpp>

#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>

namespace test_layer {
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

MatrixXd random_matrix(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed) {
  lora::Rng rng(seed);
  MatrixXd m(rows, cols);
  lora::fill_normal(m, rng, 0.0, 1.0);
  return m;
}

/// Expects `f` to throw E with a message containing every one of `parts`.
template <typename E, typename F>
void expect_throw_with(F f, std::initializer_list<const char*> parts) {
  try {
    f();
    ADD_FAILURE() << "expected an exception";
  } catch (const E& e) {
    const std::string what = e.what();
    for (const char* p : parts) EXPECT_NE(what.find(p), std::string::npos) << what;
  }
}

TEST(Init, FreshLayerEqualsBaseLayer) {
  const MatrixXd W0 = random_matrix(10, 7, 1);
  const VectorXd b = random_matrix(10, 1, 2);
  const MatrixXd X = random_matrix(7, 5, 3);
  lora::LoRALinear<double> layer(W0, b, config(4));
  EXPECT_TRUE((layer.B().array() == 0).all());
  MatrixXd expected = W0 * X;
  expected.colwise() += b;
  EXPECT_MATRIX_NEAR(layer.forward(X), expected, 1e-15);
}

TEST(Init, GaussianStatisticsWithinSamplingError) {
  // A ~ N(0, (1/r)^2): with m = r*k draws the sample mean has standard error (1/r)/sqrt(m) and the
  // sample variance's relative standard error is sqrt(2/m). Allow five standard errors.
  const int r = 8, k = 4096;
  lora::LoRALinear<double> layer(MatrixXd::Zero(64, k), config(r));
  const double m = double(r) * k;
  const double mean = layer.A().mean();
  const double var = (layer.A().array() - mean).square().sum() / (m - 1);
  EXPECT_LT(std::abs(mean), 5 * (1.0 / r) / std::sqrt(m));
  EXPECT_LT(std::abs(var * r * r - 1.0), 5 * std::sqrt(2.0 / m));
}

TEST(Init, KaimingUniformBoundAndVariance) {
  // kaiming_uniform_(a = sqrt(5)) on an r x k matrix: U(-1/sqrt(k), 1/sqrt(k)), variance 1/(3k).
  const int r = 16, k = 1024;
  auto cfg = config(r);
  cfg.init = lora::Init::KaimingUniform;
  lora::LoRALinear<double> layer(MatrixXd::Zero(32, k), cfg);
  const double bound = 1.0 / std::sqrt(double(k));
  EXPECT_LE(layer.A().cwiseAbs().maxCoeff(), bound);
  EXPECT_GT(layer.A().cwiseAbs().maxCoeff(), 0.99 * bound);
  const double m = double(r) * k;
  const double var = layer.A().array().square().mean();
  EXPECT_LT(std::abs(var * 3 * k - 1.0), 5 * std::sqrt(0.8 / m));  // Var(U^2)/E[U^2]^2 = 4/5
}

TEST(Init, SameSeedSameAdapterOtherSeedOtherAdapter) {
  auto c1 = config(4);
  c1.seed = 42;
  lora::LoRALinear<float> a(MatrixXf::Zero(8, 8), c1), b(MatrixXf::Zero(8, 8), c1);
  EXPECT_TRUE((a.A().array() == b.A().array()).all());
  c1.seed = 43;
  lora::LoRALinear<float> c(MatrixXf::Zero(8, 8), c1);
  EXPECT_FALSE((a.A().array() == c.A().array()).all());
}

TEST(Init, SeedGivesPinnedValues) {
  // The generator is the library's own (xoshiro256** + Box-Muller), so these values must be the
  // same with every compiler and standard library. They were computed independently in Python
  // from the published xoshiro256** and SplitMix64 reference code.
  lora::Rng rng(0);
  EXPECT_EQ(rng.next(), 0x99ec5f36cb75f2b4ULL);
  EXPECT_EQ(rng.next(), 0xbf6e1f784956452aULL);
  lora::Rng normals(5);  // Box-Muller on 53-bit uniforms, also recomputed in Python
  EXPECT_NEAR(normals.normal(), -0.6609817491416791, 1e-15);
  EXPECT_NEAR(normals.normal(), 0.6293137312379913, 1e-15);
  EXPECT_NEAR(normals.normal(), 0.25954642531212807, 1e-15);
}

TEST(Scaling, AlphaOverRankAndRsLoRA) {
  lora::LoRALinear<double> plain(MatrixXd::Zero(16, 16), config(4, 8.0));
  EXPECT_DOUBLE_EQ(plain.scaling(), 2.0);
  auto rs = config(4, 8.0);
  rs.use_rslora = true;
  lora::LoRALinear<double> rslora(MatrixXd::Zero(16, 16), rs);
  EXPECT_DOUBLE_EQ(rslora.scaling(), 4.0);
}

TEST(Counts, TrainableAndFrozenParameters) {
  lora::LoRALinear<float> layer(MatrixXf::Zero(30, 20), VectorXd::Zero(30).cast<float>(),
                                config(3));
  EXPECT_EQ(layer.trainable_parameter_count(), 3 * (30 + 20));
  EXPECT_EQ(layer.frozen_parameter_count(), 30 * 20 + 30);
  lora::LoRALinear<float> no_bias(MatrixXf::Zero(30, 20), config(3));
  EXPECT_EQ(no_bias.frozen_parameter_count(), 30 * 20);
}

TEST(OutParameters, MatchConvenienceCallsAndAcceptBlocks) {
  const MatrixXd W0 = random_matrix(6, 5, 4);
  lora::LoRALinear<double> layer(W0, config(2));
  layer.B() = random_matrix(6, 2, 5);
  const MatrixXd big = random_matrix(9, 8, 6);
  const auto X = big.block(1, 2, 5, 4);  // a block with an outer stride: passes without a copy
  lora::Workspace<double> ws;
  MatrixXd out = MatrixXd::Zero(10, 10);
  layer.forward(X, out.block(2, 3, 6, 4), ws);
  EXPECT_MATRIX_NEAR(out.block(2, 3, 6, 4), layer.forward(MatrixXd(X)), 1e-15);
  const MatrixXd G = random_matrix(6, 4, 7);
  MatrixXd dX(5, 4);
  layer.backward(X, G, dX, ws);
  const MatrixXd dA = layer.grad_A();
  layer.zero_grad();
  EXPECT_MATRIX_NEAR(dX, layer.backward(MatrixXd(X), G), 1e-15);
  EXPECT_MATRIX_NEAR(layer.grad_A(), dA, 1e-15);
}

TEST(Merge, MergedForwardEqualsUnmergedAndIsADenseLayer) {
  const MatrixXd W0 = random_matrix(12, 9, 8);
  const MatrixXd X = random_matrix(9, 4, 9);
  lora::LoRALinear<double> layer(W0, config(3));
  layer.B() = random_matrix(12, 3, 10);
  const MatrixXd unmerged = layer.forward(X);
  layer.merge();
  EXPECT_TRUE(layer.is_merged());
  const auto& merged_layer = std::as_const(layer);  // reading A and B of a merged layer: via const
  EXPECT_MATRIX_NEAR(layer.weight(),
                     (W0 + layer.scaling() * merged_layer.B() * merged_layer.A()).eval(), 1e-15);
  EXPECT_MATRIX_NEAR(layer.forward(X), unmerged, 1e-14);
  EXPECT_MATRIX_NEAR(layer.forward(X), (layer.weight() * X).eval(), 1e-15);  // just W X now
  const MatrixXd merged_weight = layer.weight();
  layer.merge();  // a no-op
  EXPECT_TRUE((layer.weight().array() == merged_weight.array()).all());
  layer.unmerge();
  layer.unmerge();  // a no-op
  EXPECT_FALSE(layer.is_merged());
  EXPECT_MATRIX_NEAR(layer.weight(), W0, 1e-15);
}

TEST(Merge, ExactRestoreIsBitExactAfterThousandCycles) {
  const MatrixXf W0 = random_matrix(64, 48, 11).cast<float>();
  lora::LoRALinear<float> layer(lora::DenseFrozenWeight<float>(W0, lora::MergeMode::ExactRestore),
                                Eigen::VectorXf(), config(8));
  layer.B() = random_matrix(64, 8, 12).cast<float>();
  for (int i = 0; i < 1000; ++i) {
    layer.merge();
    layer.unmerge();
  }
  EXPECT_TRUE((layer.weight().array() == W0.array()).all());
}

TEST(Merge, InPlaceStaysWithinDocumentedBoundAfterThousandCycles) {
  // MergeMode::InPlace: after c cycles |W - W0| <= c * 2u * (|W0| + |s B A|) elementwise.
  const int cycles = 1000;
  const MatrixXf W0 = random_matrix(64, 48, 13).cast<float>();
  lora::LoRALinear<float> layer(W0, config(8));
  layer.B() = random_matrix(64, 8, 14).cast<float>();
  const MatrixXf delta = layer.delta_weight();
  for (int i = 0; i < cycles; ++i) {
    layer.merge();
    layer.unmerge();
  }
  const float u = std::numeric_limits<float>::epsilon() / 2;
  const MatrixXf bound = cycles * 2 * u * (W0.cwiseAbs() + delta.cwiseAbs());
  EXPECT_TRUE(((layer.weight() - W0).cwiseAbs().array() <= bound.array()).all());
}

TEST(Merge, NonFiniteAdapterThrowsAndLeavesWeightUntouched) {
  const MatrixXd W0 = random_matrix(5, 5, 15);
  for (double bad : {std::nan(""), std::numeric_limits<double>::infinity()}) {
    lora::LoRALinear<double> layer(W0, config(2));
    layer.B()(1, 1) = bad;
    EXPECT_THROW(layer.merge(), std::domain_error);
    EXPECT_FALSE(layer.is_merged());
    EXPECT_TRUE((layer.weight().array() == W0.array()).all());
    layer.B()(1, 1) = 0;
    layer.A()(0, 3) = bad;
    EXPECT_THROW(layer.merge(), std::domain_error);
    EXPECT_TRUE((layer.weight().array() == W0.array()).all());
  }
}

TEST(Merge, TrainingAMergedLayerIsALogicError) {
  lora::LoRALinear<double> layer(random_matrix(4, 3, 16), config(1));
  const MatrixXd X = random_matrix(3, 2, 17), G = random_matrix(4, 2, 18);
  layer.merge();
  expect_throw_with<std::logic_error>([&] { layer.backward(X, G); }, {"unmerge"});
  expect_throw_with<std::logic_error>([&] { layer.backward_without_input_grad(X, G); },
                                      {"unmerge"});
  expect_throw_with<std::logic_error>(
      [&] { layer.set_adapter_weights(MatrixXd::Zero(1, 3), MatrixXd::Zero(4, 1)); }, {"unmerge"});
  EXPECT_EQ(std::as_const(layer).A().rows(), 1);  // reading stays allowed
  // Writing through A() while merged is allowed (merge kept its factors), but a merged forward
  // then refuses to serve the stale merge.
  layer.A()(0, 0) += 1.0;
  expect_throw_with<std::logic_error>([&] { layer.forward(X); }, {"changed after merge"});
  layer.unmerge();
  EXPECT_NO_THROW(layer.backward(X, G));
}

TEST(Errors, ConstructionNamesExpectedAndActual) {
  const MatrixXd W0 = MatrixXd::Zero(6, 4);
  expect_throw_with<std::invalid_argument>([&] { lora::LoRALinear<double>(W0, config(0)); },
                                           {"rank", "at least 1", "0"});
  expect_throw_with<std::invalid_argument>([&] { lora::LoRALinear<double>(W0, config(5)); },
                                           {"min(out, in) = 4", "got 5"});
  expect_throw_with<std::invalid_argument>(
      [&] { lora::LoRALinear<double>(W0, config(2, std::nan(""))); }, {"alpha", "finite"});
  expect_throw_with<std::invalid_argument>(
      [&] { lora::LoRALinear<double>(W0, config(2, INFINITY)); }, {"alpha", "finite"});
  expect_throw_with<std::invalid_argument>(
      [&] { lora::LoRALinear<double>(W0, VectorXd::Zero(5), config(2)); },
      {"bias", "length 6", "got 5"});
  expect_throw_with<std::invalid_argument>(
      [&] { lora::LoRALinear<double>(MatrixXd(0, 4), config(1)); }, {"1 x 1", "0 x 4"});
}

TEST(Errors, WrongShapesNameExpectedAndActual) {
  lora::LoRALinear<double> layer(MatrixXd::Zero(6, 4), config(2));
  lora::Workspace<double> ws;
  expect_throw_with<std::invalid_argument>([&] { layer.forward(MatrixXd::Zero(5, 3)); },
                                           {"X", "4 rows", "5 x 3"});
  MatrixXd H(6, 2);
  expect_throw_with<std::invalid_argument>([&] { layer.forward(MatrixXd::Zero(4, 3), H, ws); },
                                           {"H", "6 x 3", "6 x 2"});
  expect_throw_with<std::invalid_argument>(
      [&] { layer.backward(MatrixXd::Zero(4, 3), MatrixXd::Zero(6, 2)); }, {"G", "6 x 3", "6 x 2"});
  expect_throw_with<std::invalid_argument>(
      [&] { layer.backward(MatrixXd::Zero(3, 3), MatrixXd::Zero(6, 3)); }, {"X", "4 rows"});
  MatrixXd dX(4, 2);
  expect_throw_with<std::invalid_argument>(
      [&] { layer.backward(MatrixXd::Zero(4, 3), MatrixXd::Zero(6, 3), dX, ws); },
      {"dX", "4 x 3", "4 x 2"});
  expect_throw_with<std::invalid_argument>(
      [&] { layer.set_adapter_weights(MatrixXd::Zero(2, 5), MatrixXd::Zero(6, 2)); },
      {"A", "2 x 4", "2 x 5"});
}

TEST(Errors, OutputsThatAliasInputsAreRefused) {
  lora::LoRALinear<double> layer(MatrixXd::Zero(4, 4), config(2));
  lora::Workspace<double> ws;
  MatrixXd buf = MatrixXd::Zero(4, 3);
  expect_throw_with<std::invalid_argument>([&] { layer.forward(buf, buf, ws); },
                                           {"H", "share memory", "X"});
  MatrixXd G = MatrixXd::Zero(4, 3);
  expect_throw_with<std::invalid_argument>([&] { layer.backward(buf, G, G, ws); },
                                           {"dX", "share memory", "G"});
}

TEST(EmptyBatch, ZeroColumnsGiveEmptyResultsAndNoGradient) {
  lora::LoRALinear<double> layer(random_matrix(5, 3, 19), config(2));
  const MatrixXd X(3, 0), G(5, 0);
  EXPECT_EQ(layer.forward(X).cols(), 0);
  EXPECT_EQ(layer.backward(X, G).cols(), 0);
  EXPECT_EQ(layer.grad_A().norm(), 0.0);
}

}  // namespace
}  // namespace test_layer
