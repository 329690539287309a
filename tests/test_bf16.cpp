// The bf16 frozen base against an fp64 reference, with the error bound that bf16 rounding implies.
//
// Derivation (u = 2^-8, bf16's unit roundoff; v = 2^-24, fp32's). The frozen product uses
// w' = bf16(w) = w(1 + e1) and x' = bf16(x) = x(1 + e2), |e1|, |e2| <= u, so each product
//   |w'x' - wx| = |wx| |e1 + e2 + e1 e2| <= (2u + u^2) |w||x|,
// and w'x' is exact in fp32 (8 + 8 significant bits < 24). Summing K such terms in fp32 adds at
// most gamma_K = K v / (1 - K v) times the sum of their magnitudes (Higham, Thm 3.1), and the
// adapter's fp32 terms and the final additions are bounded the same way. Elementwise:
//   |H - H_ref| <= (2u + u^2) (|W||X|) + gamma_{k+r+4} ((1+u)^2 |W||X| + s|B|(|A||X|) + |b|)
// and likewise for dX with W^T and G (G is rounded to bf16 for the frozen term). The same bound
// holds for every kernel that runs the frozen product (oneDNN on the prepacked or strided weight,
// the portable panels, and lora's bf16 GEMV for batches of up to Bf16FrozenWeight::kGemvMaxBatch
// columns): they differ only in the order of the k fp32 additions. dA and dB never
// touch bf16 (the adapter path is fp32): their bound is the fp32 one. The merged weight is
// rounded once more, round(W0' + s B A), so its forward gets one more u:
//   |H_merged - H_ref| <= (3u + 4u^2) M + gamma_{k+r+4} 2 M,   M = (|W0| + s|B||A|)|X| + |b|.
#include "test_helpers.hpp"

#include <lora/bf16_frozen_weight.hpp>
#include <lora/detail/bf16_gemv.hpp>
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

// A back end and, for oneDNN, how it reads the weight.
struct Kernel {
  lora::Bf16Backend backend;
  lora::Bf16WeightLayout layout;
};

std::string name_of(const Kernel& k) {
  if (k.backend != lora::Bf16Backend::OneDnn) return "Portable";
  return k.layout == lora::Bf16WeightLayout::Prepacked ? "OneDnnPrepacked" : "OneDnnStrided";
}

std::vector<Kernel> backends() {
  std::vector<Kernel> out{{lora::Bf16Backend::Portable, lora::Bf16WeightLayout::Prepacked}};
  if (lora::Bf16FrozenWeight::onednn_available()) {
    out.push_back({lora::Bf16Backend::OneDnn, lora::Bf16WeightLayout::Prepacked});
    out.push_back({lora::Bf16Backend::OneDnn, lora::Bf16WeightLayout::Strided});
  }
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
  Layer layer(const Shape& sh, Kernel kernel) {
    lora::LoRAConfig cfg;
    cfg.rank = sh.r;
    cfg.alpha = 2.0 * sh.r + 1.0;
    Layer l(lora::Bf16FrozenWeight(W, lora::MergeMode::ExactRestore, kernel.backend, kernel.layout),
            b, cfg);
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

class Bf16Test : public ::testing::TestWithParam<std::tuple<Kernel, int>> {
 public:
  // n = 1, 2, 3 (and 4, the largest GEMV batch) run on the GEMV where the kernel uses it; d and k
  // are not multiples of 16 or 4, so the kernels' tails run too.
  static constexpr Shape kShapes[] = {{7, 5, 3, 2},      {64, 48, 17, 4},  {130, 257, 33, 8},
                                      {300, 520, 20, 8}, {257, 130, 1, 3}, {97, 301, 1, 5},
                                      {130, 257, 2, 4},  {300, 520, 3, 8}, {61, 83, 4, 2}};
  static constexpr int kShapeCount = int(sizeof(kShapes) / sizeof(kShapes[0]));

 protected:
  Shape shape() const { return kShapes[std::get<1>(GetParam())]; }
  Kernel backend() const { return std::get<0>(GetParam()); }
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

INSTANTIATE_TEST_SUITE_P(Shapes, Bf16Test,
                         ::testing::Combine(::testing::ValuesIn(backends()),
                                            ::testing::Range(0, Bf16Test::kShapeCount)),
                         [](const auto& info) {
                           return name_of(std::get<0>(info.param)) + "_shape" +
                                  std::to_string(std::get<1>(info.param));
                         });

// lora's bf16 GEMV on its own, both kernels (AVX-512 where compiled in, and the portable loops),
// against fp64: with W and X already bf16 values every product is exact, so the only error is
// the fp32 summation of k terms onto H's initial value:
//   |H - H_ref| <= gamma_{k+1} (|H0| + |W||Xr|),   and likewise for dX with d terms.
// Strided outputs (outer stride > rows), overwrite and accumulate, batches past 4 (the kernels
// take 4 columns at a time), and several threads' slabs (parallel_for runs them one after the
// other without OpenMP: the split is tested either way).
TEST(Bf16Gemv, MatchesFp64WithinFp32Summation) {
  struct Case {
    int d, k, n, threads;
  };
  for (const Case c : {Case{97, 301, 1, 1}, Case{130, 257, 3, 2}, Case{33, 17, 4, 1},
                       Case{70, 50, 6, 1}, Case{1000, 800, 2, 3}, Case{16, 1, 1, 1}}) {
    for (const bool portable : {false, true}) {
      std::srand(unsigned(c.d * 7 + c.n));
      const MatF W = MatF::Random(c.d, c.k), X = MatF::Random(c.k, c.n), G = MatF::Random(c.d, c.n);
      lora::detail::Bf16Matrix Wb;
      lora::detail::to_bf16(W, Wb);
      MatF Wr(c.d, c.k), Xr(c.k, c.n), Gr(c.d, c.n);
      lora::detail::from_bf16(Wb.data(), Wr.data(), Wr.size());
      lora::detail::round_through_bf16(X.data(), Xr.data(), X.size());
      lora::detail::round_through_bf16(G.data(), Gr.data(), G.size());
      const MatD Wd = Wr.cast<double>(), aW = Wd.cwiseAbs();
      const std::string what = "d=" + std::to_string(c.d) + " k=" + std::to_string(c.k) +
                               " n=" + std::to_string(c.n) + (portable ? " portable" : " best");

      for (const bool accumulate : {false, true}) {
        MatF big = MatF::Random(c.d + 5, c.n + 1);  // H is a block with outer stride d + 5
        const MatF around = big, H0 = big.block(2, 1, c.d, c.n);
        lora::detail::bf16_gemv(Wb.data(), c.d, c.k, Xr.data(), c.k, c.n, &big(2, 1),
                                big.outerStride(), accumulate, c.threads, portable);
        const MatD start = accumulate ? MatD(H0.cast<double>()) : MatD::Zero(c.d, c.n);
        const MatD ref = start + Wd * Xr.cast<double>();
        const MatD bound =
            gamma32(c.k + 1) * (start.cwiseAbs() + aW * Xr.cast<double>().cwiseAbs());
        expect_within(big.block(2, 1, c.d, c.n), ref, bound, ("H " + what).c_str());
        EXPECT_TRUE(big.col(0) == around.col(0) && big.topRows(2) == around.topRows(2) &&
                    big.bottomRows(3) == around.bottomRows(3))
            << what << ": wrote outside its block";
      }

      MatF dX = MatF::Random(c.k, c.n);
      const MatD dX0 = dX.cast<double>();
      lora::detail::bf16_gemv_transposed_add(Wb.data(), c.d, c.k, Gr.data(), c.d, c.n, dX.data(),
                                             dX.outerStride(), c.threads, portable);
      const MatD ref_t = dX0 + Wd.transpose() * Gr.cast<double>();
      const MatD bound_t =
          gamma32(c.d + 1) * (dX0.cwiseAbs() + aW.transpose() * Gr.cast<double>().cwiseAbs());
      expect_within(dX, ref_t, bound_t, ("dX " + what).c_str());
    }
  }
}

// The layer's small-batch products leave the rows and columns around a strided output alone.
TEST(Bf16FrozenWeight, SmallBatchWritesOnlyItsBlock) {
  for (const Kernel kernel : backends()) {
    const MatF W = MatF::Random(40, 24), X = MatF::Random(24, 2);
    lora::Bf16FrozenWeight w(W, lora::MergeMode::ExactRestore, kernel.backend, kernel.layout);
    MatF big = MatF::Constant(45, 4, 3.0f);
    w.multiply(X, big.block(2, 1, 40, 2));
    EXPECT_TRUE((big.topRows(2).array() == 3.0f).all()) << name_of(kernel);
    EXPECT_TRUE((big.bottomRows(3).array() == 3.0f).all()) << name_of(kernel);
    EXPECT_TRUE((big.col(0).array() == 3.0f).all()) << name_of(kernel);
    EXPECT_TRUE((big.col(3).array() == 3.0f).all()) << name_of(kernel);
    const MatF ref = w.weight() * X;  // close, not equal: X is rounded to bf16 in the product
    EXPECT_LT((big.block(2, 1, 40, 2) - ref).cwiseAbs().maxCoeff(), 0.05f) << name_of(kernel);
  }
}

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
  Layer a = p.layer(sh, {lora::Bf16Backend::Portable, lora::Bf16WeightLayout::Prepacked});
  Layer b = p.layer(sh, {lora::Bf16Backend::OneDnn, lora::Bf16WeightLayout::Prepacked});
  // Same bf16 inputs, exact products: only the fp32 summation order differs.
  const MatF Ha = a.forward(p.X), Hb = b.forward(p.X);
  const MatF S = (p.W.cwiseAbs() * p.X.cwiseAbs()).colwise() + p.b.cwiseAbs();
  EXPECT_TRUE(
      ((Ha - Hb).cwiseAbs().array() <= 2 * float(gamma32(sh.k + 8)) * 1.1f * S.array()).all());
}

TEST(Bf16FrozenWeight, ReportsItsBackend) {
  const std::string before = lora::Bf16FrozenWeight::backend_report();
  EXPECT_FALSE(before.empty());
  lora::Bf16FrozenWeight w(MatF::Ones(3, 2));
  MatF H(3, 8);
  w.multiply(MatF::Ones(2, 8), H);  // n = 8: oneDNN's matmul where it is the back end
  const std::string report = lora::Bf16FrozenWeight::backend_report();
  const std::string products = w.product_report();
  if (lora::Bf16FrozenWeight::onednn_available()) {
    EXPECT_EQ(w.backend(), lora::Bf16Backend::OneDnn);
    EXPECT_NE(report.find("oneDNN"), std::string::npos) << report;
    // The implementation oneDNN chose ("brg:avx512_core_bf16", "brg:avx512_core_amx_bf16", ...)
    // is named, per product and among those in use in the process.
    EXPECT_NE(report.find("in use: "), std::string::npos) << report;
    EXPECT_NE(products.find("dst(8 x 3) = src(8 x 2) * wei(2 x 3, prepacked): "), std::string::npos)
        << products;
    const std::string impl = products.substr(products.find("prepacked): ") + 12);
    EXPECT_GT(impl.size(), 2u) << products;
    EXPECT_NE(report.find(impl.substr(0, impl.find('\n'))), std::string::npos) << report;
  } else {
    EXPECT_EQ(w.backend(), lora::Bf16Backend::Portable);
    EXPECT_NE(report.find("portable"), std::string::npos) << report;
    EXPECT_NE(products.find("GEMV"), std::string::npos) << products;
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

TEST(Bf16FrozenWeight, NonFiniteValuesStayNonFiniteAndTheStorageRefusesThem) {
  const float values[3] = {std::numeric_limits<float>::infinity(), std::nanf(""), 3.4e38f};
  EXPECT_TRUE(std::isinf(lora::detail::widen_bf16(lora::detail::round_to_bf16(values[0]))));
  EXPECT_TRUE(std::isnan(lora::detail::widen_bf16(lora::detail::round_to_bf16(values[1]))));
  // 3.4e38 rounds past bf16's largest finite value
  EXPECT_TRUE(std::isinf(lora::detail::widen_bf16(lora::detail::round_to_bf16(values[2]))));
  for (float v : values) {  // never stored as W0 (tests/test_hostile_numbers.cpp: the messages)
    MatF W = MatF::Ones(2, 3);
    W(1, 2) = v;
    EXPECT_THROW(lora::Bf16FrozenWeight{W}, std::domain_error) << v;
  }
}

}  // namespace
}  // namespace test_bf16
