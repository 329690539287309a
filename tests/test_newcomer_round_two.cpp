// The newcomer's second round: layers built from a file onto any frozen storage (NF4, bf16),
// PEFT's conveniences (disable/enable, the first adapter active, frozen adapters, schedules,
// optimizer state, every add_weighted_adapter combination, summary of a braced list). Every
// expected value is computed here independently: a plain dense formula on the storage's own
// weight, transformers' schedule formulas, hand-worked combinations, an uninterrupted run.
#include "test_helpers.hpp"

#include <lora/lora.hpp>

#include <sys/stat.h>

#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace test_newcomer_round_two {
namespace {

using Eigen::MatrixXd;
using Eigen::MatrixXf;
using Eigen::VectorXd;
using Eigen::VectorXf;

std::string tmp_path(const std::string& name) {
  const std::string root = LORA_TEST_TMP_DIR;
  ::mkdir(root.c_str(), 0777);
  return root + "/round_two_" + name;
}

template <typename M>
bool bit_identical(const M& a, const M& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(typename M::Scalar) * a.size()) == 0;
}

lora::LoRAConfig config(int rank, double alpha, std::uint64_t seed, bool dora = false) {
  lora::LoRAConfig c;
  c.rank = rank;
  c.alpha = alpha;
  c.seed = seed;
  c.use_dora = dora;
  return c;
}

/// H = W X + b + s B A X, or DoRA's (m / ||W + s B A||_row) .* (W X + s B A X) + b, with W the
/// weight the storage holds (dequantized NF4, rounded bf16): a plain dense computation.
template <typename Layer>
MatrixXf reference_forward(const Layer& layer, const MatrixXf& X) {
  const MatrixXf W = layer.frozen().weight();
  const MatrixXf V = W + layer.scaling() * layer.B() * layer.A();
  MatrixXf H = V * X;
  if (layer.config().use_dora)
    H = (layer.magnitude().array() / V.rowwise().norm().array()).matrix().asDiagonal() * H;
  if (layer.has_bias()) H.colwise() += layer.bias();
  return H;
}

// ---- make_layers onto any storage ---------------------------------------------------------------

struct TwoLayerFile {
  lora::peft::BaseWeights<float> weights;
  lora::peft::BaseBiases<float> biases;
  std::string dir;
};

/// Trains nothing: writes a DoRA adapter of random A, B and m for fc1 (16 x 12) and fc2 (6 x 16).
TwoLayerFile write_two_layer_file(const std::string& name, bool dora) {
  TwoLayerFile f;
  f.weights["fc1"] = MatrixXf::Random(16, 12);
  f.weights["fc2"] = MatrixXf::Random(6, 16);
  f.biases["fc1"] = VectorXf::Random(16);
  lora::LoRALinear<float> fc1(f.weights["fc1"], f.biases["fc1"], config(4, 8, 1, dora));
  lora::LoRALinear<float> fc2(f.weights["fc2"], config(4, 8, 2, dora));
  for (auto* l : {&fc1, &fc2}) {
    l->B().setRandom();
    if (dora) l->magnitude().array() += 0.25f;
  }
  f.dir = tmp_path(name);
  lora::peft::save_adapter(f.dir, {{"fc1", &fc1}, {"fc2", &fc2}});
  return f;
}

TEST(MakeLayersStorage, Nf4LayersFromAFileMatchTheDenseFormulaOnTheDequantizedWeight) {
  const TwoLayerFile f = write_two_layer_file("nf4", true);
  auto layers = lora::peft::make_layers<float, lora::Nf4FrozenWeight>(f.dir, f.weights, f.biases);
  ASSERT_EQ(layers.size(), 2u);
  const MatrixXf X = MatrixXf::Random(12, 5);
  auto& fc1 = layers.at("fc1");
  EXPECT_TRUE(fc1.config().use_dora);
  // The NF4 weight is not W0 (4 bits), but within NF4's error of it.
  EXPECT_LT((fc1.frozen().weight() - f.weights.at("fc1")).cwiseAbs().maxCoeff(), 0.2f);
  EXPECT_FALSE(fc1.frozen().weight().isApprox(f.weights.at("fc1"), 1e-4f));
  fc1.eval();
  EXPECT_MATRIX_NEAR(fc1.forward(X), reference_forward(fc1, X), 1e-4);
  // With the storage's options: single quantization, the portable kernel.
  lora::Nf4Options options;
  options.double_quantization = false;
  options.backend = lora::Nf4Backend::Portable;
  const auto plain = lora::peft::make_layers<float, lora::Nf4FrozenWeight>(f.dir, f.weights,
                                                                           f.biases, {}, options);
  EXPECT_FALSE(plain.at("fc2").frozen().double_quantization());
  EXPECT_EQ(plain.at("fc2").frozen().backend(), lora::Nf4Backend::Portable);
}

TEST(MakeLayersStorage, Bf16AndMultiLayersFromAFile) {
  const TwoLayerFile f = write_two_layer_file("bf16", false);
  const auto layers = lora::peft::make_layers<float, lora::Bf16FrozenWeight>(
      f.dir, f.weights, f.biases, {}, lora::MergeMode::ExactRestore, lora::Bf16Backend::Portable);
  const MatrixXf X = MatrixXf::Random(16, 3);
  const auto& fc2 = layers.at("fc2");
  EXPECT_EQ(fc2.frozen().backend(), lora::Bf16Backend::Portable);
  EXPECT_EQ(fc2.frozen().merge_mode(), lora::MergeMode::ExactRestore);
  // The bf16 storage's products take X rounded to bf16 as well (bf16_frozen_weight.hpp), the
  // adapter's term does not: H = W bf16(X) + s B A X.
  MatrixXf Xr = X;
  for (Eigen::Index i = 0; i < Xr.size(); ++i)
    Xr.data()[i] = lora::io::bf16_to_float(lora::io::float_to_bf16(Xr.data()[i]));
  const MatrixXf expected2 = fc2.frozen().weight() * Xr + fc2.scaling() * fc2.B() * (fc2.A() * X);
  EXPECT_MATRIX_NEAR(fc2.forward(X), expected2, 2e-4);

  auto multi = lora::peft::make_multi_layers<float, lora::Nf4FrozenWeight>(f.dir, f.weights, "task",
                                                                           f.biases);
  auto& m1 = multi.at("fc1");
  EXPECT_EQ(m1.active_name(), "task");
  const MatrixXf X1 = MatrixXf::Random(12, 3);
  const auto& a = std::as_const(m1).adapter("task");
  const MatrixXf expected =
      ((m1.frozen().weight() + a.scaling() * a.B() * a.A()) * X1).colwise() + m1.bias();
  EXPECT_MATRIX_NEAR(m1.forward(X1), expected, 1e-4);
  // A bad storage option is the storage's own error.
  EXPECT_THROW((lora::peft::make_layers<float, lora::Nf4FrozenWeight>(
                   f.dir, f.weights, f.biases, {}, lora::MergeMode::InPlace)),
               std::invalid_argument);
}

// ---- disable / enable, the first adapter active
// ---------------------------------------------------

TEST(Conveniences, LoRALinearDisableAndEnable) {
  const MatrixXf W0 = MatrixXf::Random(7, 5);
  const VectorXf b = VectorXf::Random(7);
  lora::LoRALinear<float> layer(W0, b, config(2, 4, 3));
  layer.B().setRandom();
  const MatrixXf X = MatrixXf::Random(5, 4);
  const MatrixXf base = (W0 * X).colwise() + b;
  const MatrixXf adapted = base + 2.0f * layer.B() * (layer.A() * X);
  EXPECT_TRUE(layer.is_enabled());
  EXPECT_MATRIX_NEAR(layer.forward(X), adapted, 1e-5);
  layer.merge();
  layer.disable();  // unmerges
  EXPECT_FALSE(layer.is_merged());
  EXPECT_FALSE(layer.is_enabled());
  EXPECT_MATRIX_NEAR(layer.forward(X), base, 1e-5);
  EXPECT_THROW(layer.backward(X, MatrixXf::Ones(7, 4)), std::logic_error);
  layer.disable();  // a no-op
  layer.enable();
  layer.enable();  // a no-op
  EXPECT_MATRIX_NEAR(layer.forward(X), adapted, 1e-5);
}

TEST(Conveniences, MultiLoRALinearActivatesTheFirstAdapterAddedAsPeft) {
  const MatrixXd W0 = MatrixXd::Random(6, 4);
  lora::MultiLoRALinear<double> layer(W0);
  layer.add_adapter("a", config(2, 2, 1)).B().setRandom();
  EXPECT_EQ(layer.active_name(), "a");
  const MatrixXd X = MatrixXd::Random(4, 3);
  const auto& a = std::as_const(layer).adapter("a");
  EXPECT_MATRIX_NEAR(layer.forward(X), W0 * X + a.B() * (a.A() * X), 1e-13);  // s = 1
  layer.add_adapter("b", config(2, 2, 2));
  EXPECT_EQ(layer.active_name(), "a");  // later adapters do not switch
  layer.disable();
  layer.remove_adapter("a");
  EXPECT_FALSE(layer.has_active());  // "b" is not the first added: it stays inactive
}

// ---- a frozen adapter's backward gives dX only
// ------------------------------------------------------

TEST(Conveniences, FrozenAdapterBackwardReturnsDxAndKeepsGradients) {
  const MatrixXd W0 = MatrixXd::Random(8, 6);
  lora::LoRALinear<double> layer(W0, config(3, 6, 4));
  layer.B().setRandom();
  layer.grad_A().setConstant(0.5);  // gradients from an earlier run stay as they are
  const MatrixXd grad_A = layer.grad_A(), grad_B = layer.grad_B();
  layer.set_requires_grad(false);
  EXPECT_FALSE(layer.requires_grad());
  const MatrixXd X = MatrixXd::Random(6, 5), G = MatrixXd::Random(8, 5);
  // dX = W0^T G + s A^T (B^T G), s = 2
  const MatrixXd expected =
      W0.transpose() * G + 2.0 * layer.A().transpose() * (layer.B().transpose() * G);
  EXPECT_MATRIX_NEAR(layer.backward(X, G), expected, 1e-12);
  EXPECT_TRUE(bit_identical(layer.grad_A(), grad_A));
  EXPECT_TRUE(bit_identical(layer.grad_B(), grad_B));
  layer.backward_without_input_grad(X, G);
  EXPECT_TRUE(bit_identical(layer.grad_B(), grad_B));
  layer.set_requires_grad(true);
  layer.backward(X, G);
  EXPECT_FALSE(bit_identical(layer.grad_B(), grad_B));
}

TEST(Conveniences, FrozenDoraAdapterWithDropoutGivesTheTrainableDx) {
  lora::LoRAConfig cfg = config(2, 4, 5, true);
  cfg.dropout = 0.3;
  lora::LoRALinear<double> trainable(MatrixXd::Random(6, 5), VectorXd::Random(6), cfg);
  trainable.B().setRandom();
  lora::LoRALinear<double> frozen = trainable;  // the same adapter and dropout stream
  frozen.set_requires_grad(false);
  const MatrixXd X = MatrixXd::Random(5, 4), G = MatrixXd::Random(6, 4);
  const MatrixXd H1 = trainable.forward(X), H2 = frozen.forward(X);
  ASSERT_TRUE(bit_identical(H1, H2));
  EXPECT_TRUE(bit_identical(frozen.backward(X, G), trainable.backward(X, G)));
  EXPECT_TRUE(frozen.grad_magnitude().isZero(0));
  EXPECT_TRUE(frozen.grad_A().isZero(0));
  EXPECT_FALSE(trainable.grad_A().isZero(0));
}

// ---- learning-rate schedules: transformers' formulas
// ---------------------------------------------

TEST(Schedules, LinearAndCosineWithWarmupAsTransformers) {
  // get_linear_schedule_with_warmup(opt, 10, 100) on lr 1e-3: step/10 below 10, then
  // (100 - step) / 90, floored at 0.
  const auto linear = lora::LRSchedule::linear_with_warmup(1e-3, 10, 100);
  EXPECT_DOUBLE_EQ(linear.learning_rate(0), 0.0);
  EXPECT_DOUBLE_EQ(linear.learning_rate(5), 0.5e-3);
  EXPECT_DOUBLE_EQ(linear.learning_rate(10), 1e-3);
  EXPECT_DOUBLE_EQ(linear.factor(55), 45.0 / 90.0);
  EXPECT_DOUBLE_EQ(linear.factor(100), 0.0);
  EXPECT_DOUBLE_EQ(linear.factor(150), 0.0);
  // get_cosine_schedule_with_warmup(opt, 10, 100): 0.5 (1 + cos(pi * (step - 10) / 90)).
  const auto cosine = lora::LRSchedule::cosine_with_warmup(1.0, 10, 100);
  EXPECT_DOUBLE_EQ(cosine.factor(3), 0.3);
  EXPECT_DOUBLE_EQ(cosine.factor(10), 1.0);
  EXPECT_NEAR(cosine.factor(55), 0.5, 1e-15);
  EXPECT_NEAR(cosine.factor(40), 0.75, 1e-15);  // progress 1/3: 0.5 (1 + cos(pi / 3))
  EXPECT_NEAR(cosine.factor(100), 0.0, 1e-15);
  // Two cycles: back to 1 halfway.
  EXPECT_NEAR(lora::LRSchedule::cosine_with_warmup(1.0, 0, 100, 2.0).factor(50), 1.0, 1e-15);
  EXPECT_THROW(lora::LRSchedule::linear_with_warmup(-1, 1, 1), std::invalid_argument);
  // apply(): the optimizer's next step uses f(step_count()).
  Eigen::MatrixXf p = Eigen::MatrixXf::Ones(1, 1), g = Eigen::MatrixXf::Ones(1, 1);
  lora::SGD<float> sgd({lora::make_parameter(p, g)}, {1.0});
  const auto s = lora::LRSchedule::linear_with_warmup(1.0, 4, 8);
  s.apply(sgd);
  EXPECT_EQ(sgd.learning_rate(), 0.0);
  sgd.step();
  s.apply(sgd);
  EXPECT_EQ(sgd.learning_rate(), 0.25);
}

// ---- optimizer state: resume bit for bit
// -----------------------------------------------------------

/// A few AdamW steps of a LoRA layer on a fixed regression task, lr from a cosine schedule.
void train(lora::LoRALinear<float>& layer, lora::AdamW<float>& opt, int steps) {
  const auto schedule = lora::LRSchedule::cosine_with_warmup(1e-2, 3, 10);
  for (int i = 0; i < steps; ++i) {
    lora::Rng rng(7 + static_cast<std::uint64_t>(opt.step_count()));  // the batch of this step
    MatrixXf X(5, 4);
    lora::fill_uniform(X, rng, -1, 1);
    const MatrixXf G = layer.forward(X) - MatrixXf::Ones(6, 4);
    opt.zero_grad();
    layer.backward(X, G);
    schedule.apply(opt);
    opt.step();
  }
}

TEST(OptimizerState, TenStepsEqualFivePlusFiveResumedFromFiles) {
  const MatrixXf W0 = MatrixXf::Random(6, 5);
  lora::LoRALinear<float> straight(W0, config(2, 4, 9));
  lora::AdamW<float> opt(straight.parameters());
  train(straight, opt, 10);

  lora::LoRALinear<float> first(W0, config(2, 4, 9));
  lora::AdamW<float> opt1(first.parameters());
  train(first, opt1, 5);
  const std::string dir = tmp_path("resume");
  lora::peft::save_adapter(dir, {{"layer", &first}});
  lora::save_optimizer_state(dir + "/optimizer.safetensors", opt1);

  lora::LoRALinear<float> resumed(W0, config(2, 4, 123));  // another init: the file decides
  lora::peft::load_adapter(dir, {{"layer", &resumed}});
  lora::AdamW<float> opt2(resumed.parameters());
  lora::load_optimizer_state(dir + "/optimizer.safetensors", opt2);
  EXPECT_EQ(opt2.step_count(), 5);
  train(resumed, opt2, 5);
  EXPECT_TRUE(bit_identical(resumed.A(), straight.A()));
  EXPECT_TRUE(bit_identical(resumed.B(), straight.B()));
  EXPECT_TRUE(bit_identical(opt2.second_moment(1), opt.second_moment(1)));

  // Another optimizer's file, or other parameters, are refused.
  lora::SGD<float> sgd(resumed.parameters(), {0.1, 0.9});
  EXPECT_THROW(lora::load_optimizer_state(dir + "/optimizer.safetensors", sgd),
               lora::io::FormatError);
  lora::LoRALinear<float> other(W0, config(3, 4, 9));
  lora::AdamW<float> opt3(other.parameters());
  EXPECT_THROW(lora::load_optimizer_state(dir + "/optimizer.safetensors", opt3),
               std::invalid_argument);
  lora::save_optimizer_state(dir + "/sgd.safetensors", sgd);
  lora::SGD<float> sgd2(resumed.parameters(), {0.1, 0.9});
  lora::load_optimizer_state(dir + "/sgd.safetensors", sgd2);
  EXPECT_EQ(sgd2.step_count(), 0);
}

// ---- add_weighted_adapter: PEFT's combination types
// ------------------------------------------------

/// Two rank-1 adapters of a 2 x 3 weight with hand-picked factors, s = 1.
struct Pair {
  lora::LoRAAdapter<double> a{2, 3, config(1, 1, 0)}, b{2, 3, config(1, 1, 0)};
  Pair() {
    MatrixXd A1(1, 3), B1(2, 1), A2(1, 3), B2(2, 1);
    A1 << 1, -2, 3;
    B1 << 4, -1;
    A2 << -3, 1, 1;
    B2 << 2, 2;
    a.set_weights(A1, B1);
    b.set_weights(A2, B2);
  }
  std::vector<const lora::LoRAAdapter<double>*> both() const { return {&a, &b}; }
};

TEST(WeightedAdapter, LinearMergesAAndBSeparatelyWithSquareRootWeights) {
  const Pair p;
  // weights 4 and 1: v = 2, 1. A = 2 A1 + A2 = [-1, -3, 7]; B = 2 B1 + B2 = [10, 0].
  const auto c = lora::combine_adapters<double>(p.both(), {4, 1}, lora::Combination::Linear,
                                                lora::CombineOptions{});
  MatrixXd A(1, 3), B(2, 1);
  A << -1, -3, 7;
  B << 10, 0;
  EXPECT_MATRIX_NEAR(c.A(), A, 1e-15);
  EXPECT_MATRIX_NEAR(c.B(), B, 1e-15);
  EXPECT_EQ(c.scaling(), 1.0);
  EXPECT_THROW(lora::combine_adapters<double>(p.both(), {-1, 1}, lora::Combination::Linear,
                                              lora::CombineOptions{}),
               std::invalid_argument);
}

TEST(WeightedAdapter, MagnitudePruneAndTiesByHand) {
  const Pair p;
  lora::CombineOptions o;
  o.density = 0.67;  // int(0.67 * 3) = 2 of A's 3 values, int(0.67 * 2) = 1 of B's 2
  // MagnitudePrune, weights 1, 1: A1 -> [0, -2, 3], A2 -> [-3, 1, 0] (tie |1| = |1|: lower index
  // kept); B1 -> [4, 0], B2 -> [2, 0] (tie: the first). Sums: A = [-3, -1, 3], B = [6, 0].
  auto c = lora::combine_adapters<double>(p.both(), {1, 1}, lora::Combination::MagnitudePrune, o);
  MatrixXd A(1, 3), B(2, 1);
  A << -3, -1, 3;
  B << 6, 0;
  EXPECT_MATRIX_NEAR(c.A(), A, 1e-15);
  EXPECT_MATRIX_NEAR(c.B(), B, 1e-15);
  // TIES, weights 1, 1 (v = 1): the pruned A's are [0, -2, 3] and [-3, 1, 0]. Column 0: only -3
  // (sum -3: sign -) -> -3. Column 1: -2 and 1, sum -1: sign -, keep -2 -> -2. Column 2: 3.
  // B: [4, 0] and [2, 0]: row 0 mean of 4 and 2 = 3; row 1: 0.
  c = lora::combine_adapters<double>(p.both(), {1, 1}, lora::Combination::Ties, o);
  A << -3, -2, 3;
  B << 3, 0;
  EXPECT_MATRIX_NEAR(c.A(), A, 1e-15);
  EXPECT_MATRIX_NEAR(c.B(), B, 1e-15);
  // Frequency: column 1 has one - and one +: a tie goes to +, keeping 1.
  o.majority_sign = lora::MajoritySign::Frequency;
  c = lora::combine_adapters<double>(p.both(), {1, 1}, lora::Combination::Ties, o);
  EXPECT_EQ(c.A()(0, 1), 1.0);
}

TEST(WeightedAdapter, DareKeepsOrDropsEachValueRescaledAndIsSeeded) {
  lora::LoRAAdapter<double> a(40, 50, config(4, 4, 1)), zero(40, 50, config(4, 4, 2));
  a.B().setRandom();
  zero.B().setRandom();
  lora::CombineOptions o;
  o.density = 0.25;
  o.seed = 11;
  // Weight 0 on the second adapter: A = mask .* (sqrt(w s) A1) / density, elementwise.
  const auto c =
      lora::combine_adapters<double>({&a, &zero}, {4, 0}, lora::Combination::DareLinear, o);
  Eigen::Index kept = 0;
  for (Eigen::Index i = 0; i < c.A().size(); ++i) {
    const double v = c.A().data()[i];
    if (v == 0) continue;
    ++kept;
    EXPECT_NEAR(v, 2.0 * a.A().data()[i] / 0.25, 1e-12);
  }
  EXPECT_NEAR(static_cast<double>(kept) / static_cast<double>(c.A().size()), 0.25, 0.1);
  const auto again =
      lora::combine_adapters<double>({&a, &zero}, {4, 0}, lora::Combination::DareLinear, o);
  EXPECT_TRUE(bit_identical(again.A(), c.A()));
  o.density = 0;
  EXPECT_THROW(lora::combine_adapters<double>({&a, &zero}, {1, 1}, lora::Combination::DareTies, o),
               std::invalid_argument);
}

TEST(WeightedAdapter, SvdFormsPruneTheDenseDeltasThenTruncate) {
  const Pair p;
  lora::MultiLoRALinear<double> layer(MatrixXd::Zero(2, 3));
  layer.add_adapter("a", p.a);
  layer.add_adapter("b", p.b);
  lora::CombineOptions o;
  o.density = 0.5;  // int(0.5 * 6) = 3 of each delta's 6 values
  o.svd_rank = 2;
  auto& c = layer.add_weighted_adapter("m", {"a", "b"}, {1, 0.5},
                                       lora::Combination::MagnitudePruneSvd, o);
  // D1 = B1 A1 = [4 -8 12; -1 2 -3] keeps 12, -8, 4 (column-major indices 4, 2, 0);
  // D2 = B2 A2 = [-6 2 2; -6 2 2] keeps the two -6 and the first 2 (index 2).
  MatrixXd D(2, 3);
  D << 4 - 3, -8 + 1, 12, -3, 0, 0;
  EXPECT_MATRIX_NEAR(MatrixXd(c.B() * c.A()), D, 1e-12);  // rank 2 holds it exactly
  EXPECT_THROW(layer.add_weighted_adapter("x", {"a", "b"}, {1, 1}, lora::Combination::Linear,
                                          [] {
                                            lora::CombineOptions bad;
                                            bad.density = -1;
                                            return bad;
                                          }()),
               std::invalid_argument);
}

// ---- summary of a braced list
// ----------------------------------------------------------------------

TEST(Conveniences, SummaryOfABracedList) {
  lora::LoRALinear<float> fc1(MatrixXf::Zero(8, 5), VectorXf::Zero(8), config(2, 4, 0));
  lora::LoRALinear<float> fc2(MatrixXf::Zero(3, 8), config(1, 4, 0));
  // trainable: 2 * (8 + 5) + 1 * (3 + 8) = 37; frozen: 40 + 8 + 24 = 72.
  const auto s = lora::summary({{"fc1", &fc1}, {"fc2", fc2}});
  EXPECT_EQ(s.trainable, 37);
  EXPECT_EQ(s.total, 109);
  lora::LoRALinear<float>* none = nullptr;
  EXPECT_THROW(lora::summary({{"fc1", none}}), std::invalid_argument);
}

}  // namespace
}  // namespace test_newcomer_round_two
