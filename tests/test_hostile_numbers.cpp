// Hostile numbers: finite inputs at the edges of the types (a DoRA magnitude of 1e-40, a Gram
// matrix that overflows float, gradients of 1e20, subnormal NF4 blocks, ...) and call sequences
// that leave stale state (a DoRA tape of another routing, a load that fails half-way). Each is
// either refused with the documented exception or computed right; the DoRA cases are compared with
// a double-precision computation written out here (plain dense math, not the library's code).
#include "test_helpers.hpp"

#include <lora/bf16_frozen_weight.hpp>
#include <lora/lora_linear.hpp>
#include <lora/multi_lora_linear.hpp>
#include <lora/nf4_frozen_weight.hpp>
#include <lora/optim.hpp>
#include <lora/peft/adapter_io.hpp>
#include <lora/peft/make_layers.hpp>
#include <lora/weighted_adapter.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace test_hostile_numbers {
namespace {

using MatF = Eigen::MatrixXf;
using VecF = Eigen::VectorXf;
using MatD = Eigen::MatrixXd;
using VecD = Eigen::VectorXd;

/// DoRA's output in double: H = (m / ||W0 + s B A||_row) .* ((W0 + s B A) X) + b.
template <typename M, typename V>
MatD dora_reference(const M& W0, double s, const M& B, const M& A, const V& m, const V& b,
                    const M& X) {
  const MatD W =
      W0.template cast<double>() + s * B.template cast<double>() * A.template cast<double>();
  MatD H = W * X.template cast<double>();
  for (Eigen::Index i = 0; i < W.rows(); ++i) {
    const double norm = W.row(i).norm();
    const double c = norm > 0 ? double(m(i)) / norm : 0.0;
    H.row(i) *= c;
    if (b.size()) H.row(i).array() += double(b(i));
  }
  return H;
}

/// dL/dm in double for the columns `cols` of X: sum_j G_ij (W X)_ij / ||W_i||.
MatD dora_dm_reference(const MatD& W0, double s, const MatD& B, const MatD& A, const MatD& X,
                       const MatD& G, const std::vector<int>& cols) {
  const MatD W = W0 + s * B * A;
  VecD dm = VecD::Zero(W.rows());
  for (int j : cols)
    for (Eigen::Index i = 0; i < W.rows(); ++i)
      dm(i) += G(i, j) * W.row(i).dot(X.col(j)) / W.row(i).norm();
  return dm;
}

lora::LoRAConfig plain_config(int rank) {
  lora::LoRAConfig cfg;
  cfg.rank = rank;
  return cfg;
}

lora::LoRAConfig dora_config(int rank, double alpha) {
  lora::LoRAConfig cfg;
  cfg.rank = rank;
  cfg.alpha = alpha;
  cfg.use_dora = true;
  return cfg;
}

std::string fresh_dir(const std::string& tag) {
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern =
      std::string(tmp && *tmp ? tmp : "/tmp") + "/lora_hostile_" + tag + "_XXXXXX";
  std::vector<char> buf(pattern.begin(), pattern.end());
  buf.push_back('\0');
  EXPECT_NE(::mkdtemp(buf.data()), nullptr);
  return std::string(buf.data());
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

// ---- 1. an inverse row scale that is not finite must not reach an InPlace W0 -------------------

TEST(HostileNumbers, TinyDoraMagnitudeInPlaceMergeIsRefusedBeforeW0IsTouched) {
  MatF W0(3, 4);
  W0 << 1, 2, 0, -1, 0.5f, -0.25f, 3, 1, -2, 1, 1, 0.5f;
  const VecF bias = VecF::Zero(3);
  lora::LoRALinear<float> layer(W0, bias, dora_config(1, 1.0));  // dense fp32: InPlace
  MatF A(1, 4), B(3, 1);
  A << 0.5f, -1, 0.25f, 1;
  B << 0.5f, -0.5f, 0.25f;
  layer.adapter().set_weights(A, B);
  VecF m = layer.adapter().magnitude();
  m(1) = 1e-40f;  // finite (subnormal); 1 / (m / ||W||) is inf in float
  layer.adapter().set_magnitude(m);
  EXPECT_THROW(layer.merge(), std::domain_error);
  EXPECT_FALSE(layer.is_merged());
  EXPECT_TRUE((layer.weight().array() == W0.array()).all());  // untouched, bit for bit
  // The unmerged layer still computes DoRA right (against double).
  layer.eval();
  MatF X(4, 2);
  X << 1, -1, 0.5f, 2, -0.25f, 1, 2, 0;
  const MatD ref = dora_reference(W0, 1.0, B, A, m, bias, X);
  const MatF H = layer.forward(X);
  for (Eigen::Index i = 0; i < 3; ++i)
    for (Eigen::Index j = 0; j < 2; ++j)
      EXPECT_NEAR(H(i, j), ref(i, j), 1e-6 * std::abs(ref(i, j)) + 1e-44) << i << ", " << j;

  // The bf16 base in InPlace mode refuses it the same way.
  lora::LoRALinear<float, lora::Bf16FrozenWeight> bf(
      lora::Bf16FrozenWeight(W0, lora::MergeMode::InPlace), bias, dora_config(1, 1.0));
  bf.adapter().set_weights(A, B);
  bf.adapter().set_magnitude(m);
  const MatF before = bf.weight();
  EXPECT_THROW(bf.merge(), std::domain_error);
  EXPECT_TRUE((bf.weight().array() == before.array()).all());
}

// ---- 2. a Gram matrix A A^T that overflows float
// -------------------------------------------------

TEST(HostileNumbers, DoraRowNormIsRightWhenTheGramMatrixOverflowsFloat) {
  const MatF W0 = MatF::Identity(2, 2);
  lora::LoRALinear<float> layer(W0, VecF(), dora_config(1, 1.0));  // s = 1
  MatF A(1, 2), B(2, 1);
  A << 2e19f, 0;  // A A^T = 4e38: inf in float
  B << 1e-19f, 0;
  layer.adapter().set_weights(A, B);  // row 0 of W = [3, 0]: norm 3
  const VecF m = layer.adapter().magnitude();
  MatF X(2, 3);
  X << 1, -2, 0.5f, 1, 4, -1;
  const MatD ref = dora_reference(W0, 1.0, B, A, m, VecF(), X);
  layer.eval();
  EXPECT_MATRIX_NEAR(layer.forward(X), ref, 1e-6);
  layer.train();  // the training forward (taped) too
  EXPECT_MATRIX_NEAR(layer.forward(X), ref, 1e-6);
  // The merged weight: diag(m / ||W||) W = [[1, 0], [0, 1]] up to rounding.
  layer.merge();
  const MatD W = W0.cast<double>() + B.cast<double>() * A.cast<double>();
  MatD merged = W;
  for (Eigen::Index i = 0; i < 2; ++i) merged.row(i) *= double(m(i)) / W.row(i).norm();
  EXPECT_MATRIX_NEAR(layer.weight(), merged, 1e-6);
}

TEST(HostileNumbers, DoraRowThatOverflowsDoubleIsRefusedNotZeroed) {
  MatD W0 = MatD::Identity(2, 2);
  lora::LoRALinear<double> layer(W0, VecD(), dora_config(1, 1.0));
  MatD A(1, 2), B(2, 1);
  A << 1e300, 0;
  B << 1e300, 0;  // s B A = 1e600: not finite in double
  layer.adapter().set_weights(A, B);
  layer.eval();
  EXPECT_THROW(layer.forward(MatD::Ones(2, 1)), std::domain_error);
}

// ---- 3. DoRA's tape is used only for the routing that wrote it
// -----------------------------------

TEST(HostileNumbers, DoraBackwardAfterAMixedForwardOfAnotherRoutingIsExact) {
  std::mt19937 gen(7);
  std::normal_distribution<double> N(0.0, 1.0);
  const auto rnd = [&](Eigen::Index r, Eigen::Index c) {
    return MatD(MatD::NullaryExpr(r, c, [&] { return N(gen); }));
  };
  const MatD W0 = rnd(4, 3), X = rnd(3, 5), G = rnd(4, 5);
  lora::MultiLoRALinear<double> layer(W0);
  const double s = 2.0;  // alpha 2, r 1
  MatD As[2], Bs[2];
  for (int a = 0; a < 2; ++a) {
    auto& ad = layer.add_adapter(a == 0 ? "a" : "b", dora_config(1, 2.0));
    As[a] = rnd(1, 3);
    Bs[a] = rnd(4, 1);
    ad.set_weights(As[a], Bs[a]);
  }
  layer.train();
  const auto dm = [&](int a) { return MatD(layer.adapter(a == 0 ? "a" : "b").grad_magnitude()); };

  // Forward routed {0,0,1,1,-1}, backward routed {1,1,0,0,-1}.
  layer.forward_mixed(X, {0, 0, 1, 1, -1});
  layer.zero_grad();
  layer.backward_mixed(X, {1, 1, 0, 0, -1}, G);
  EXPECT_MATRIX_NEAR(dm(0), dora_dm_reference(W0, s, Bs[0], As[0], X, G, {2, 3}), 1e-12);
  EXPECT_MATRIX_NEAR(dm(1), dora_dm_reference(W0, s, Bs[1], As[1], X, G, {0, 1}), 1e-12);

  // A mixed forward, then a plain backward of the active adapter over every column.
  layer.set_active("a");
  layer.forward_mixed(X, {0, 0, 1, 1, -1});
  layer.zero_grad();
  layer.backward(X, G);
  EXPECT_MATRIX_NEAR(dm(0), dora_dm_reference(W0, s, Bs[0], As[0], X, G, {0, 1, 2, 3, 4}), 1e-12);

  // The routing the forward had still uses the tape, and is right.
  layer.forward_mixed(X, {0, 1, 0, -1, 1});
  layer.zero_grad();
  layer.backward_mixed(X, {0, 1, 0, -1, 1}, G);
  EXPECT_MATRIX_NEAR(dm(0), dora_dm_reference(W0, s, Bs[0], As[0], X, G, {0, 2}), 1e-12);
  EXPECT_MATRIX_NEAR(dm(1), dora_dm_reference(W0, s, Bs[1], As[1], X, G, {1, 4}), 1e-12);
}

// ---- 4. combine_adapters never drops a DoRA magnitude silently
// ------------------------------------

TEST(HostileNumbers, CombineAdaptersRefusesDora) {
  lora::LoRAAdapter<float> dora(4, 3, dora_config(2, 4.0));
  dora.set_magnitude(VecF::Ones(4));
  EXPECT_THROW(lora::combine_adapters<float>({&dora}, {1.0}, lora::Combination::Cat),
               std::invalid_argument);
  EXPECT_THROW(lora::combine_adapters<float>({&dora}, {1.0}, lora::Combination::Svd),
               std::invalid_argument);
}

// ---- 5. load_adapter into MultiLoRALinear layers: all or nothing
// ---------------------------------

TEST(HostileNumbers, LoadAdapterIntoMultiLayersIsAllOrNothing) {
  const std::string dir = fresh_dir("load");
  MatF W0 = MatF::Random(4, 3);
  {
    lora::LoRAAdapter<float> a(4, 3, dora_config(1, 1.0)), b(4, 3, dora_config(1, 1.0));
    a.set_magnitude(VecF::Ones(4));
    b.set_magnitude(VecF::Ones(4));
    lora::peft::write_adapter<float>(dir, {{"fc", &a}, {"fc2", &b}});
  }
  lora::MultiLoRALinear<float> fc(W0), fc2(W0);
  lora::LoRAConfig plain;
  plain.rank = 1;
  fc2.add_adapter("base", plain);
  fc2.set_active("base");
  fc2.merge();  // a merged layer no longer has W0's row norms for a DoRA adapter
  std::map<std::string, lora::MultiLoRALinear<float>*> layers{{"fc", &fc}, {"fc2", &fc2}};
  EXPECT_THROW(lora::peft::load_adapter(dir, layers, "d"), std::logic_error);
  EXPECT_FALSE(fc.has_adapter("d"));
  EXPECT_FALSE(fc2.has_adapter("d"));
  EXPECT_THROW(lora::peft::load_adapter(dir, {{"fc", &fc}, {"fc2", &fc2}}, "d"), std::logic_error);
  EXPECT_FALSE(fc.has_adapter("d"));

  // One layer given for two modules.
  lora::MultiLoRALinear<float> same(W0);
  std::map<std::string, lora::MultiLoRALinear<float>*> twice{{"fc", &same}, {"fc2", &same}};
  EXPECT_THROW(lora::peft::load_adapter(dir, twice, "d"), std::invalid_argument);
  EXPECT_FALSE(same.has_adapter("d"));
  EXPECT_THROW(lora::peft::load_adapter(dir, {{"fc", &same}, {"fc2", &same}}, "d"),
               std::invalid_argument);
  EXPECT_FALSE(same.has_adapter("d"));
  lora::LoRALinear<float> single(W0, VecF(), plain_config(1));
  const MatF A_before = single.adapter().A();
  EXPECT_THROW(lora::peft::load_adapter(dir, {{"fc", &single}, {"fc2", &single}}),
               std::invalid_argument);
  EXPECT_TRUE((single.adapter().A().array() == A_before.array()).all());
  EXPECT_FALSE(single.adapter().uses_dora());
  std::filesystem::remove_all(dir);
}

// ---- 6. clip_grad_norm on large finite gradients
// -------------------------------------------------

TEST(HostileNumbers, ClipGradNormOfLargeFiniteFloatGradientsIsTheirNorm) {
  lora::LoRALinear<float> layer(MatF::Ones(4, 3), VecF(), plain_config(2));
  auto params = lora::adapter_parameters(layer);
  layer.adapter().grad_A().setConstant(1e20f);  // norm in float: (1e20)^2 overflows
  layer.adapter().grad_B().setZero();
  const double expected = std::sqrt(double(layer.adapter().grad_A().size())) * 1e20;
  float norm = 0;
  ASSERT_NO_THROW(norm = lora::clip_grad_norm(params, 1.0f));
  EXPECT_NEAR(norm, expected, 1e-6 * expected);
  // Clipped to norm 1: every element 1 / sqrt(count).
  const double each = 1.0 / std::sqrt(double(layer.adapter().grad_A().size()));
  EXPECT_NEAR(layer.adapter().grad_A()(0, 0), each, 1e-5 * each);
  // Doubles beyond the range of their squares.
  lora::LoRALinear<double> wide(MatD::Ones(4, 3), VecD(), plain_config(2));
  auto wide_params = lora::adapter_parameters(wide);
  wide.adapter().grad_A().setConstant(1e200);
  wide.adapter().grad_B().setZero();
  const double wide_expected = std::sqrt(double(wide.adapter().grad_A().size())) * 1e200;
  EXPECT_NEAR(lora::clip_grad_norm(wide_params, 1.0), wide_expected, 1e-12 * wide_expected);
  // A NaN is still refused.
  layer.adapter().grad_B()(0, 0) = std::nanf("");
  EXPECT_THROW(lora::clip_grad_norm(params, 1.0f), std::domain_error);
}

// ---- 7. NF4 blocks with a subnormal absmax
// --------------------------------------------------------

TEST(HostileNumbers, Nf4SubnormalBlocksKeepTheErrorBound) {
  MatF W0(2, 64);
  for (Eigen::Index j = 0; j < 64; ++j) {
    W0(0, j) = (j % 3 == 0) ? 0.0f : float(j - 32) * 3e-42f;  // absmax about 1e-40: subnormal
    W0(1, j) = float(j) * 1e-3f;
  }
  lora::Nf4Options opt;
  opt.double_quantization = false;
  const MatF back = lora::Nf4FrozenWeight(W0, opt).weight();
  const double c = W0.row(0).cwiseAbs().maxCoeff();
  const double slack = std::numeric_limits<float>::denorm_min();  // the product's rounding
  for (Eigen::Index j = 0; j < 64; ++j)
    EXPECT_LE(std::abs(double(back(0, j)) - double(W0(0, j))), c * 0.1519 + slack) << j;
}

// ---- 8. NF4's panel buffer is bounded by bytes, whatever the shape
// -------------------------------

TEST(HostileNumbers, Nf4PanelBufferIsBoundedForTallAndWideWeights) {
  const int threads = Eigen::nbThreads();
  Eigen::setNbThreads(1);  // the products then run on this thread, whose buffer is measured
  const std::size_t limit = std::size_t(4) << 20;  // docs/nf4.md: at most about 4 MiB (fp32)
  std::mt19937 gen(3);
  std::normal_distribution<float> N(0.0f, 1.0f);
  struct Shape {
    Eigen::Index d, k;
  };
  // Tall (64 columns of d floats were 5 MiB; an LM head's d = 131072 made 32 MiB) and wide (16 rows
  // of k floats were 4.5 MiB).
  for (Shape sh : {Shape{20000, 64}, Shape{16, 70000}}) {
    const MatF W0 = MatF::NullaryExpr(sh.d, sh.k, [&] { return N(gen); });
    lora::Nf4Options opt;
    opt.backend = lora::Nf4Backend::Portable;
    const lora::Nf4FrozenWeight w(W0, opt);
    const MatF Wq = w.weight();
    const MatF X = MatF::NullaryExpr(sh.k, 2, [&] { return N(gen); });
    const MatF G = MatF::NullaryExpr(sh.d, 2, [&] { return N(gen); });
    MatF H(sh.d, 2), dX = MatF::Zero(sh.k, 2);
    w.multiply(X, H);
    EXPECT_LE(lora::Nf4FrozenWeight::thread_panel_bytes(), limit) << sh.d << " x " << sh.k;
    w.multiply_transposed_add(G, dX);
    EXPECT_LE(lora::Nf4FrozenWeight::thread_panel_bytes(), limit) << sh.d << " x " << sh.k;
    // The tiles add up to the whole product (fp32 summation against double).
    EXPECT_MATRIX_NEAR(H, (Wq.cast<double>() * X.cast<double>()).eval(), 1e-5);
    EXPECT_MATRIX_NEAR(dX, (Wq.transpose().cast<double>() * G.cast<double>()).eval(), 1e-5);
  }
  Eigen::setNbThreads(threads);
}

// ---- 9. smaller: save paths, a zero row, c beyond float, NaN in a bf16 W0
// -------------------------------------

TEST(HostileNumbers, SaveAdapterCreatesOnlyTheFoldersOfTheNormalisedPath) {
  const std::string base = fresh_dir("save");
  lora::LoRALinear<float> layer(MatF::Ones(4, 3), VecF(), plain_config(1));
  lora::peft::save_adapter(base + "/a/p1/../p2", {{"fc", &layer}});
  EXPECT_FALSE(exists(base + "/a/p1"));
  EXPECT_TRUE(exists(base + "/a/p2/adapter_model.safetensors"));
  lora::peft::save_adapter(base + "/q1/q2/../../q3/", {{"fc", &layer}});
  EXPECT_FALSE(exists(base + "/q1"));
  EXPECT_TRUE(exists(base + "/q3/adapter_config.json"));
  EXPECT_EQ(lora::peft::detail::normalize_path("/../a/./b//c/.."), "/a/b");
  EXPECT_EQ(lora::peft::detail::normalize_path("../x/../y"), "../y");
  EXPECT_EQ(lora::peft::detail::normalize_path("a/.."), ".");
  std::filesystem::remove_all(base);
}

TEST(HostileNumbers, DoraMergeOverAZeroRowThrowsTheDocumentedDomainError) {
  MatF W0(2, 3);
  W0 << 1, 2, 3, 0, 0, 0;  // row 1 is zero, B = 0: ||W||_1 = 0, c_1 = 0
  lora::LoRALinear<float> layer(W0, VecF(), dora_config(1, 1.0));
  EXPECT_THROW(layer.merge(), std::domain_error);  // not std::invalid_argument
  EXPECT_TRUE((layer.weight().array() == W0.array()).all());
  // ExactRestore can merge it (no division on unmerge).
  lora::LoRALinear<float> exact(lora::DenseFrozenWeight<float>(W0, lora::MergeMode::ExactRestore),
                                VecF(), dora_config(1, 1.0));
  exact.merge();
  exact.unmerge();
  EXPECT_TRUE((exact.weight().array() == W0.array()).all());
}

TEST(HostileNumbers, DoraMagnitudeBeyondFloatOverNormStillGivesAFiniteOutput) {
  MatF W0(2, 2);
  W0 << 0.5f, 0, 0, 1;
  lora::LoRALinear<float> layer(W0, VecF(), dora_config(1, 1.0));
  VecF m = layer.adapter().magnitude();
  m(0) = 3e38f;  // c = m / ||W|| = 6e38: beyond float; c * z = 7.5e37 is not
  layer.adapter().set_magnitude(m);
  MatF X(2, 1);
  X << 0.25f, 0;
  const MatF B = MatF::Zero(2, 1);
  layer.eval();
  const MatF H = layer.forward(X);
  const MatD ref = dora_reference(W0, 1.0, B, layer.adapter().A(), m, VecF(), X);
  ASSERT_TRUE(H.allFinite()) << H;
  EXPECT_MATRIX_NEAR(H, ref, 1e-6);
}

TEST(HostileNumbers, Bf16RefusesNonFiniteW0AsNf4Does) {
  for (float v : {std::nanf(""), std::numeric_limits<float>::infinity(), 3.4e38f}) {
    MatF W0 = MatF::Ones(3, 2);
    W0(2, 1) = v;
    EXPECT_THROW(lora::Bf16FrozenWeight{W0}, std::domain_error) << v;
    if (std::isfinite(v)) continue;
    EXPECT_THROW(lora::Nf4FrozenWeight{W0}, std::domain_error) << v;
  }
}

// ---- 10. double quantization next to outliers: the documented bound, and its cost ---------------

TEST(HostileNumbers, Nf4DoubleQuantizationWithOutliersKeepsTheDocumentedBound) {
  // 256 rows x 64: one block per row, all 256 blocks in one scale group. Four weights of 1e5.
  std::mt19937 gen(11);
  std::normal_distribution<float> N(0.0f, 1.0f);
  MatF W0 = MatF::NullaryExpr(256, 64, [&] { return N(gen); });
  for (int i = 0; i < 4; ++i) W0(i * 64, 5) = 1e5f;
  double worst_plain = 0, worst_dq = 0, excess = -1;
  for (bool dq : {false, true}) {
    lora::Nf4Options opt;
    opt.double_quantization = dq;
    const MatF back = lora::Nf4FrozenWeight(W0, opt).weight();
    // The group's m: the largest |c - mean(c)| (one group here).
    const VecF c = W0.cwiseAbs().rowwise().maxCoeff();
    const double mean = c.cast<double>().mean();
    const double m = (c.cast<double>().array() - mean).abs().maxCoeff();
    for (Eigen::Index i = 0; i < 256; ++i) {
      const double err = (back.row(i) - W0.row(i)).cast<double>().cwiseAbs().maxCoeff();
      const double bound = c(i) * 0.1519 + (dq ? m / 254 : 0.0) + 1e-3;  // + the code's rounding
      excess = std::max(excess, err - bound);
      if (i % 64 == 0) continue;  // rows without an outlier: relative error to their own absmax
      (dq ? worst_dq : worst_plain) = std::max(dq ? worst_dq : worst_plain, err / c(i));
    }
  }
  EXPECT_LE(excess, 0.0);
  // What docs/nf4.md says: the outliers' scale group codes every other block's absmax in steps of
  // m / 127, so these rows lose all their digits (relative error far above 1) with double
  // quantization, and keep NF4's own (at most 0.1519) without it.
  EXPECT_LE(worst_plain, 0.1519);
  EXPECT_GT(worst_dq, 1.0);
  std::printf(
      "NF4 with 4 outliers of 1e5 in N(0, 1): worst relative error of the other rows %.3g "
      "without double quantization, %.3g with it\n",
      worst_plain, worst_dq);
}

}  // namespace
}  // namespace test_hostile_numbers
