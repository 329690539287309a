// The bf16 frozen base against an fp64 reference, with the error bound that bf16 rounding implies.
//
// Derivation (u = 2^-8, bf16's unit roundoff; v = 2^-24, fp32's). The frozen product uses
// w' = bf16(w) = w(1 + e1) and x' = bf16(x) = x(1 + e2), |e1|, |e2| <= u, so each product
//   |w'x' - wx| = |wx| |e1 + e2 + e1 e2| <= (2u + u^2) |w||x|,
// and w'x' is exact in fp32 (8 + 8 significant bits < 24). Summing K such terms in fp32 adds at
// most gamma_K = K v / (1 - K v) times the sum of their magnitudes (Higham, Thm 3.1), and the
// adapter's fp32 terms and the final additions are bounded the same way. Elementwise:
//   |H - H_ref| <= (2u + u^2) (|W||X|) + gamma_{k+r+4} ((1+u)^2 |W||X| + s|B|(|A||X|) + |b|)
// and likewise for dX with W^T and G (G is rounded to bf16 for the frozen term). dA and dB never
// touch bf16 (the adapter path is fp32): their bound is the fp32 one. The merged weight is
// rounded once more, round(W0' + s B A), so its forward gets one more u:
//   |H_merged - H_ref| <= (3u + 4u^2) M + gamma_{k+r+4} 2 M,   M = (|W0| + s|B||A|)|X| + |b|.
#include "test_helpers.hpp"

#include <lora/bf16_frozen_weight.hpp>
#include <lora/lora.hpp>

#include <gtest/gtest.h>

#include <Eigen/Core>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace test_bf16 {
namespace {

using MatF = Eigen::MatrixXf;
using MatD = Eigen::MatrixXd;
using VecF = Eigen::VectorXf;
using Layer = lora::LoRALinear<float, lora::Bf16FrozenWeight>;

constexpr double kU = 1.0 / 256.0;       // bf16 unit roundoff, 2^-8
constexpr double kV = 1.0 / 16777216.0;  // fp32 unit roundoff, 2^-24
double gamma32(double n) {
  return n * kV / (1.0 - n * kV);
}

struct Shape {
  int d, k, n, r;
};

std::string name_of(lora::Bf16Backend b) {
  return b == lora::Bf16Backend::OneDnn ? "OneDnn" : "Portable";
}

std::vector<lora::Bf16Backend> backends() {
  std::vector<lora::Bf16Backend> out{lora::Bf16Backend::Portable};
  if (lora::Bf16FrozenWeight::onednn_available()) out.push_back(lora::Bf16Backend::OneDnn);
  return out;
}

// Random data with a fixed seed per shape; B is non-zero so that the adapter's terms count.
struct Problem {
  MatF W, X, G, A, B;
  VecF b;
  float s = 0;
  explicit Problem(const Shape& sh) {
    std::srand(1234u + unsigned(sh.d * 31 + sh.k * 7 + sh.n));
    W = MatF::Random(sh.d, sh.k) / std::sqrt(float(sh.k));
    X = MatF::Random(sh.k, sh.n);
    G = MatF::Random(sh.d, sh.n);
    A = MatF::Random(sh.r, sh.k) * 0.1f;
    B = MatF::Random(sh.d, sh.r) * 0.1f;
    b = VecF::Random(sh.d);
  }
  Layer layer(const Shape& sh, lora::Bf16Backend backend) {
    lora::LoRAConfig cfg;
    cfg.rank = sh.r;
    cfg.alpha = 2.0 * sh.r + 1.0;
    Layer l(lora::Bf16FrozenWeight(W, lora::MergeMode::ExactRestore, backend), b, cfg);
    l.set_adapter_weights(A, B);
    s = l.scaling();
    return l;
  }
};

MatD abs_d(const MatF& m) {
  return m.cast<double>().cwiseAbs();
}

// Every element of `got` within `bound` of `ref`; reports the worst element on failure.
void expect_within(const MatF& got, const MatD& ref, const MatD& bound, const char* what) {
  ASSERT_EQ(got.rows(), ref.rows());
  ASSERT_EQ(got.cols(), ref.cols());
  const MatD err = (got.cast<double>() - ref).cwiseAbs();
  Eigen::Index i = 0, j = 0;
  const double worst = (err.array() / bound.array().max(1e-300)).maxCoeff(&i, &j);
  EXPECT_LE(worst, 1.0) << what << ": error " << err(i, j) << " exceeds the bound " << bound(i, j)
                        << " at (" << i << ", " << j << ")";
}

class Bf16Test : public ::testing::TestWithParam<std::tuple<lora::Bf16Backend, int>> {
 protected:
  static constexpr Shape kShapes[] = {
      {7, 5, 3, 2}, {64, 48, 17, 4}, {130, 257, 33, 8}, {300, 520, 20, 8}, {257, 130, 1, 3}};
  Shape shape() const { return kShapes[std::get<1>(GetParam())]; }
  lora::Bf16Backend backend() const { return std::get<0>(GetParam()); }
};

TEST_P(Bf16Test, ForwardWithinTheBf16Bound) {
  const Shape sh = shape();
  Problem p(sh);
  Layer layer = p.layer(sh, backend());
  const MatF H = layer.forward(p.X);

  const MatD Wd = p.W.cast<double>(), Xd = p.X.cast<double>();
  const MatD ref = (Wd * Xd + p.s * p.B.cast<double>() * (p.A.cast<double>() * Xd)).colwise() +
                   p.b.cast<double>();
  const MatD S = abs_d(p.W) * abs_d(p.X);
  const MatD lowrank = p.s * abs_d(p.B) * (abs_d(p.A) * abs_d(p.X));
  const MatD bias = abs_d(p.b).replicate(1, sh.n);
  const MatD bound = (2 * kU + kU * kU) * S +
                     gamma32(sh.k + sh.r + 4) * ((1 + kU) * (1 + kU) * S + lowrank + bias);
  expect_within(H, ref, bound, "forward");
  // The bound is not vacuous: bf16 really is coarser than fp32 here.
  EXPECT_GT((H.cast<double>() - ref).cwiseAbs().maxCoeff(), 1e-6 * S.maxCoeff());
}

TEST_P(Bf16Test, GradientsWithinTheirBounds) {
  const Shape sh = shape();
  Problem p(sh);
  Layer layer = p.layer(sh, backend());
  const MatF dX = layer.backward(p.X, p.G);

  const MatD Wd = p.W.cast<double>(), Xd = p.X.cast<double>(), Gd = p.G.cast<double>();
  const MatD Ad = p.A.cast<double>(), Bd = p.B.cast<double>();
  const MatD dX_ref = Wd.transpose() * Gd + p.s * Ad.transpose() * (Bd.transpose() * Gd);
  const MatD dB_ref = p.s * Gd * (Ad * Xd).transpose();
  const MatD dA_ref = p.s * (Bd.transpose() * Gd) * Xd.transpose();

  const MatD aW = abs_d(p.W), aX = abs_d(p.X), aG = abs_d(p.G), aA = abs_d(p.A), aB = abs_d(p.B);
  const MatD S = aW.transpose() * aG;
  const MatD lowrank = p.s * aA.transpose() * (aB.transpose() * aG);
  const MatD dX_bound =
      (2 * kU + kU * kU) * S + gamma32(sh.d + sh.r + 4) * ((1 + kU) * (1 + kU) * S + lowrank);
  expect_within(dX, dX_ref, dX_bound, "dX");
  expect_within(layer.grad_B(), dB_ref, gamma32(sh.k + sh.n + 2) * p.s * aG * (aA * aX).transpose(),
                "dB (fp32 path)");
  expect_within(layer.grad_A(), dA_ref,
                gamma32(sh.d + sh.n + 2) * p.s * (aB.transpose() * aG) * aX.transpose(),
                "dA (fp32 path)");
}

TEST_P(Bf16Test, MergedForwardWithinTheBoundOfUnmerged) {
  const Shape sh = shape();
  Problem p(sh);
  Layer layer = p.layer(sh, backend());
  const MatF unmerged = layer.forward(p.X);
  layer.merge();
  ASSERT_TRUE(layer.is_merged());
  const MatF merged = layer.forward(p.X);

  const MatD Xd = p.X.cast<double>();
  const MatD Weff = p.W.cast<double>() + p.s * p.B.cast<double>() * p.A.cast<double>();
  const MatD ref = (Weff * Xd).colwise() + p.b.cast<double>();
  const MatD bias = abs_d(p.b).replicate(1, sh.n);
  const MatD M = (abs_d(p.W) + p.s * abs_d(p.B) * abs_d(p.A)) * abs_d(p.X) + bias;
  const MatD merged_bound = (3 * kU + 4 * kU * kU) * M + gamma32(sh.k + sh.r + 4) * 2 * M;
  expect_within(merged, ref, merged_bound, "merged forward");
  // Unmerged is within its own (smaller) bound of the same reference, so the two agree within
  // the sum of the bounds.
  expect_within(merged, unmerged.cast<double>(), merged_bound + merged_bound, "merged - unmerged");
}

TEST_P(Bf16Test, UnmergeRestoresW0BitForBitAfter1000Cycles) {
  const Shape sh = shape();
  Problem p(sh);
  Layer layer = p.layer(sh, backend());
  const lora::detail::Bf16Matrix before = layer.frozen().bf16_weight();
  const MatF H0 = layer.forward(p.X);
  for (int c = 0; c < 1000; ++c) {
    layer.merge();
    layer.unmerge();
  }
  const lora::detail::Bf16Matrix& after = layer.frozen().bf16_weight();
  ASSERT_EQ(after.size(), before.size());
  EXPECT_EQ(std::memcmp(after.data(), before.data(), sizeof(std::uint16_t) * before.size()), 0);
  const MatF H1 = layer.forward(p.X);
  EXPECT_EQ(std::memcmp(H0.data(), H1.data(), sizeof(float) * H0.size()), 0);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, Bf16Test, ::testing::Combine(::testing::ValuesIn(backends()), ::testing::Range(0, 5)),
    [](const auto& info) {
      return name_of(std::get<0>(info.param)) + "_shape" + std::to_string(std::get<1>(info.param));
    });

TEST(Bf16FrozenWeight, StoresW0RoundedToNearestEven) {
  MatF W(2, 2);
  // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties to even gives 1.
  W << 1.0f + 1.0f / 256.0f, 1.0f + 3.0f / 256.0f, -2.5f, 0.0f;
  lora::Bf16FrozenWeight w(W);
  const MatF back = w.weight();
  EXPECT_EQ(back(0, 0), 1.0f);
  EXPECT_EQ(back(0, 1), 1.0f + 4.0f / 256.0f);  // 1 + 3*2^-8 ties up to the even 1 + 2^-6
  EXPECT_EQ(back(1, 0), -2.5f);
  EXPECT_EQ(back(1, 1), 0.0f);
}

TEST(Bf16FrozenWeight, BackendsAgreeToSummationOrder) {
  if (!lora::Bf16FrozenWeight::onednn_available()) GTEST_SKIP() << "oneDNN not in this build";
  const Shape sh{96, 80, 9, 4};
  Problem p(sh);
  Layer a = p.layer(sh, lora::Bf16Backend::Portable);
  Layer b = p.layer(sh, lora::Bf16Backend::OneDnn);
  // Same bf16 inputs, exact products: only the fp32 summation order differs.
  const MatF Ha = a.forward(p.X), Hb = b.forward(p.X);
  const MatF S = (p.W.cwiseAbs() * p.X.cwiseAbs()).colwise() + p.b.cwiseAbs();
  EXPECT_TRUE(
      ((Ha - Hb).cwiseAbs().array() <= 2 * float(gamma32(sh.k + 8)) * 1.1f * S.array()).all());
}

TEST(Bf16FrozenWeight, ReportsItsBackend) {
  const std::string report = lora::Bf16FrozenWeight::backend_report();
  EXPECT_FALSE(report.empty());
  lora::Bf16FrozenWeight w(MatF::Ones(3, 2));
  if (lora::Bf16FrozenWeight::onednn_available()) {
    EXPECT_EQ(w.backend(), lora::Bf16Backend::OneDnn);
    EXPECT_NE(report.find("oneDNN"), std::string::npos) << report;
  } else {
    EXPECT_EQ(w.backend(), lora::Bf16Backend::Portable);
    EXPECT_NE(report.find("portable"), std::string::npos) << report;
  }
}

TEST(Bf16FrozenWeight, AskingForOneDnnWithoutItThrows) {
  if (lora::Bf16FrozenWeight::onednn_available()) GTEST_SKIP() << "oneDNN is in this build";
  try {
    lora::Bf16FrozenWeight w(MatF::Ones(3, 2), lora::MergeMode::InPlace, lora::Bf16Backend::OneDnn);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("oneDNN"), std::string::npos) << e.what();
  }
}

TEST(Bf16FrozenWeight, StateErrorsAndShapes) {
  EXPECT_THROW(lora::Bf16FrozenWeight(MatF(0, 3)), std::invalid_argument);
  lora::Bf16FrozenWeight w(MatF::Ones(4, 3));
  EXPECT_EQ(w.out_features(), 4);
  EXPECT_EQ(w.in_features(), 3);
  const MatF B = MatF::Ones(4, 1), A = MatF::Ones(1, 3);
  EXPECT_THROW(w.unmerge(1.0f, B, A, VecF()), std::logic_error);
  w.merge(0.5f, B, A, VecF());
  EXPECT_THROW(w.merge(0.5f, B, A, VecF()), std::logic_error);
  EXPECT_EQ(w.weight()(0, 0), 1.5f);
  EXPECT_EQ(w.pristine_weight()(0, 0), lora::detail::round_to_bf16(1.0f));
  w.unmerge(0.5f, B, A, VecF());
  EXPECT_EQ(w.weight()(0, 0), 1.0f);
}

TEST(Bf16FrozenWeight, NonFiniteValuesStayNonFinite) {
  MatF W(1, 3);
  W << std::numeric_limits<float>::infinity(), std::nanf(""), 3.4e38f;
  const MatF back = lora::Bf16FrozenWeight(W).weight();
  EXPECT_TRUE(std::isinf(back(0, 0)));
  EXPECT_TRUE(std::isnan(back(0, 1)));
  EXPECT_TRUE(std::isinf(back(0, 2)));  // 3.4e38 rounds past bf16's largest finite value
}

}  // namespace
}  // namespace test_bf16
