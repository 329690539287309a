// Nf4FrozenWeight (lora/nf4_frozen_weight.hpp): the NF4 format against bitsandbytes' rules, the
// quantization error bound, and the products and the layer against fp64 on the dequantized weight.
// Built as test_nf4 (the back end Auto picks: portable without oneDNN) and, when oneDNN is found,
// as test_nf4_onednn (bf16 panels into oneDNN's matmul).

// Eigen's allocation guard, made to throw in release builds too (this binary only, as in
// test_optim.cpp): once set_is_malloc_allowed(false) is called, any heap allocation by Eigen
// throws.
#include <stdexcept>
#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x) \
  if (!(x)) throw std::runtime_error("Eigen assertion failed: " #x)

#include "test_helpers.hpp"

#include <lora/lora.hpp>
#include <lora/nf4_frozen_weight.hpp>

#include <gtest/gtest.h>

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <utility>

namespace nf4_test {

using lora::Nf4FrozenWeight;
using lora::Nf4Options;
using Matrix = Eigen::MatrixXf;
using MatrixD = Eigen::MatrixXd;
using Vector = Eigen::VectorXf;
using Index = Eigen::Index;
namespace nf4 = lora::detail::nf4;

static_assert(lora::check_frozen_storage<Nf4FrozenWeight>());

Matrix gaussian(Index rows, Index cols, std::uint32_t seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  Matrix m(rows, cols);
  for (Index j = 0; j < cols; ++j)
    for (Index i = 0; i < rows; ++i) m(i, j) = dist(rng);
  return m;
}

Nf4Options options(bool double_quant) {
  Nf4Options o;
  o.double_quantization = double_quant;
  return o;
}

/// The nearest NF4 code by a plain search over the table, a tie going to the lower code
/// (bitsandbytes' rule), written independently of nf4::quantize_code's threshold count.
int nearest_code(float x) {
  int best = 0;
  for (int c = 1; c < 16; ++c) {
    const double dc = std::abs(double(x) - double(nf4::kCodes[c]));
    const double db = std::abs(double(x) - double(nf4::kCodes[best]));
    if (dc < db) best = c;
  }
  return best;
}

/// dequant(W0) computed from the definition: blocks of 64 along each row, absmax, nearest code of
/// w * (1 / absmax), value times absmax (no double quantization).
Matrix reference_dequant(const Matrix& W0) {
  Matrix out(W0.rows(), W0.cols());
  for (Index i = 0; i < W0.rows(); ++i)
    for (Index b = 0; b < W0.cols(); b += 64) {
      const Index count = std::min<Index>(64, W0.cols() - b);
      const float c = W0.row(i).segment(b, count).cwiseAbs().maxCoeff();
      for (Index j = b; j < b + count; ++j)
        out(i, j) = c == 0.0f ? 0.0f : nf4::kCodes[nearest_code(W0(i, j) * (1.0f / c))] * c;
    }
  return out;
}

/// The weight and the input as the storage's products see them: bf16-rounded on the oneDNN back
/// end, unchanged on the portable one.
bool rounds_to_bf16(const Nf4FrozenWeight& w) {
  return w.backend() == lora::Nf4Backend::OneDnn;
}
MatrixD as_multiplied(const Nf4FrozenWeight& w, const Matrix& m) {
  if (!rounds_to_bf16(w)) return m.cast<double>();
  MatrixD out(m.rows(), m.cols());
  for (Index j = 0; j < m.cols(); ++j)
    for (Index i = 0; i < m.rows(); ++i)
      out(i, j) = lora::detail::widen_bf16(lora::detail::round_to_bf16(m(i, j)));
  return out;
}

// ---- the format -------------------------------------------------------------------------------

TEST(Nf4Format, TableIsSortedAndThresholdsAreTheMidpoints) {
  EXPECT_EQ(nf4::kCodes[0], -1.0f);
  EXPECT_EQ(nf4::kCodes[7], 0.0f);
  EXPECT_EQ(nf4::kCodes[15], 1.0f);
  double widest = 0.0;
  for (int i = 0; i < 15; ++i) {
    ASSERT_LT(nf4::kCodes[i], nf4::kCodes[i + 1]);
    const double mid = (double(nf4::kCodes[i]) + double(nf4::kCodes[i + 1])) / 2;
    // bitsandbytes took the midpoints of the table's double-precision values and wrote them as
    // float literals: within one float step of the midpoint of the float codes.
    const float t = nf4::kThresholds[i], m = static_cast<float>(mid);
    EXPECT_TRUE(t == m || std::nextafter(t, m) == m) << "threshold " << i;
    widest = std::max(widest, double(nf4::kCodes[i + 1]) - double(nf4::kCodes[i]));
  }
  EXPECT_NEAR(double(nf4::kHalfWidestGap), widest / 2, 1e-7);
}

TEST(Nf4Format, QuantizeCodeIsTheNearestCode) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int t = 0; t < 100000; ++t) {
    const float x = u(rng);
    ASSERT_EQ(int(nf4::quantize_code(x)), nearest_code(x)) << "x = " << x;
  }
}

TEST(Nf4Format, EveryCodeRoundTripsExactly) {
  // Rows scaled by powers of two, so w * (1 / absmax) is exact: every code must come back as
  // itself and dequantize to the same float.
  const float scales[] = {1.0f, 0.125f, 1024.0f, 0x1p-20f};
  Matrix W0 = Matrix::Zero(4, 64);
  for (int r = 0; r < 4; ++r) {
    W0(r, 0) = scales[r];  // absmax = the scale (code 15)
    for (int c = 0; c < 16; ++c) W0(r, 1 + c) = nf4::kCodes[c] * scales[r];
  }
  for (bool dq : {false, true}) {
    const Nf4FrozenWeight w(W0, options(dq));
    const Matrix back = w.dequantized();
    for (int r = 0; r < 4; ++r) {
      if (!dq) {
        EXPECT_EQ(w.block_scale(r, 0), scales[r]);
      }
      for (int c = 0; c < 16; ++c) {
        EXPECT_EQ(int(w.code(r, 1 + c)), c) << "row " << r << ", code " << c;
        if (!dq) {
          EXPECT_EQ(back(r, 1 + c), W0(r, 1 + c)) << "row " << r << ", code " << c;
        }
      }
    }
  }
}

TEST(Nf4Format, HalfwayWeightsGoToTheLowerCodeAsInBitsandbytes) {
  // dQuantizeNF4 tests `x > threshold`: a weight exactly on a threshold takes the lower code, the
  // next float above it the upper one.
  Matrix W0 = Matrix::Zero(15, 64);
  for (int i = 0; i < 15; ++i) {
    const float t = nf4::kThresholds[i];
    W0(i, 0) = (i % 2 == 0) ? 1.0f : -1.0f;  // absmax 1: x = w exactly
    W0(i, 1) = t;
    W0(i, 2) = std::nextafter(t, 2.0f);
    W0(i, 3) = std::nextafter(t, -2.0f);
  }
  const Nf4FrozenWeight w(W0, options(false));
  for (int i = 0; i < 15; ++i) {
    EXPECT_EQ(int(w.code(i, 1)), i) << "threshold " << i << " = " << nf4::kThresholds[i];
    EXPECT_EQ(int(w.code(i, 2)), i + 1) << "just above threshold " << i;
    EXPECT_EQ(int(w.code(i, 3)), i) << "just below threshold " << i;
  }
}

TEST(Nf4Format, PacksTwoCodesPerByteHighNibbleFirst) {
  Matrix W0 = Matrix::Zero(1, 64);
  W0(0, 0) = -1.0f;  // code 0
  W0(0, 1) = 1.0f;   // code 15
  const Nf4FrozenWeight w(W0, options(false));
  EXPECT_EQ(int(w.code(0, 0)), 0);
  EXPECT_EQ(int(w.code(0, 1)), 15);
  EXPECT_EQ(int(w.code(0, 2)), int(nf4::kZeroCode));
  EXPECT_EQ(w.packed_bytes(), std::size_t(32 + 4));  // 64 codes, one fp32 absmax
}

TEST(Nf4Format, SimdAndScalarDequantizationAgreeBitForBit) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uint8_t codes[32];
  float a[64], b[64];
  lora::detail::bf16 ha[64], hb[64];
  for (int t = 0; t < 200; ++t) {
    for (auto& c : codes) c = static_cast<std::uint8_t>(byte(rng));
    const float scale = std::ldexp(1.0f + float(t) / 199.0f, t % 40 - 20);
    nf4::dequantize_block(codes, scale, a);
    nf4::dequantize_block_scalar(codes, scale, b);
    nf4::dequantize_block_bf16(codes, scale, ha);
    nf4::dequantize_block_bf16_scalar(codes, scale, hb);
    for (int j = 0; j < 64; ++j) {
      ASSERT_EQ(a[j], b[j]) << "element " << j;
      ASSERT_EQ(ha[j], hb[j]) << "element " << j;
    }
  }
}

TEST(Nf4Format, MatchesTheDefinitionOnGaussianWeightsWithPartialBlocks) {
  const Matrix W0 = gaussian(5, 64 * 2 + 5, 21, 0.05f);  // 3 blocks per row, the last of 5
  const Nf4FrozenWeight w(W0, options(false));
  EXPECT_TRUE(w.dequantized() == reference_dequant(W0));
  for (Index i = 0; i < 5; ++i)
    EXPECT_EQ(w.block_scale(i, 2), W0.row(i).tail(5).cwiseAbs().maxCoeff());
}

TEST(Nf4Format, BlocksOfZerosDequantizeToPositiveZero) {
  Matrix W0 = gaussian(3, 130, 5);
  W0.block(1, 0, 1, 64).setZero();  // one zero block
  W0.row(2).setZero();              // a whole zero row, its last block partial
  for (bool dq : {false, true}) {
    const Nf4FrozenWeight w(W0, options(dq));
    const Matrix back = w.dequantized();
    for (Index j = 0; j < 64; ++j) {
      EXPECT_EQ(back(1, j), 0.0f);
      EXPECT_FALSE(std::signbit(back(1, j)));
      EXPECT_EQ(int(w.code(1, j)), int(nf4::kZeroCode));
    }
    for (Index j = 0; j < 130; ++j) EXPECT_EQ(back(2, j), 0.0f);
  }
  const Nf4FrozenWeight zeros(Matrix::Zero(4, 100));  // all zero, double quantization on
  EXPECT_TRUE(zeros.dequantized().isZero(0.0));
  EXPECT_TRUE(zeros.all_finite());
}

TEST(Nf4Format, OneHugeValueKeepsItselfAndFlushesItsBlock) {
  Matrix W0 = gaussian(2, 128, 8);
  W0(0, 10) = 1e30f;
  const Nf4FrozenWeight w(W0, options(false));
  const Matrix back = w.dequantized();
  EXPECT_EQ(back(0, 10), 1e30f);  // code 15 times absmax
  for (Index j = 0; j < 64; ++j)
    if (j != 10) {
      EXPECT_EQ(back(0, j), 0.0f) << "column " << j;  // |w / 1e30| < 0.0398
    }
  EXPECT_TRUE(back.block(0, 64, 2, 64) == reference_dequant(W0).block(0, 64, 2, 64));
  EXPECT_TRUE(back.row(1) == reference_dequant(W0).row(1));

  const Nf4FrozenWeight dq(W0, options(true));
  EXPECT_NEAR(dq.block_scale(0, 0), 1e30, 1e30 / 254 * 1.001);
  EXPECT_TRUE(dq.all_finite());
}

TEST(Nf4Format, RefusesNonFiniteEmptyAndInPlace) {
  const float bad[] = {std::numeric_limits<float>::quiet_NaN(),
                       std::numeric_limits<float>::infinity(),
                       -std::numeric_limits<float>::infinity()};
  for (float v : bad) {
    Matrix W0 = gaussian(4, 70, 1);
    W0(2, 66) = v;
    EXPECT_THROW(Nf4FrozenWeight{W0}, std::domain_error) << v;
  }
  EXPECT_THROW(Nf4FrozenWeight{Matrix(0, 5)}, std::invalid_argument);
  EXPECT_THROW(Nf4FrozenWeight(Matrix::Ones(2, 2), lora::MergeMode::InPlace),
               std::invalid_argument);
  try {
    Nf4FrozenWeight w(Matrix::Ones(2, 2), lora::MergeMode::InPlace);
    FAIL() << "InPlace accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("ExactRestore"), std::string::npos) << e.what();
  }
}

// ---- error bound and memory ---------------------------------------------------------------------

TEST(Nf4Error, PerBlockBoundHoldsOnGaussianWeights) {
  const Matrix W0 = gaussian(61, 64 * 9 + 17, 1234, 0.02f);
  const Index blocks = (W0.cols() + 63) / 64;
  for (bool dq : {false, true}) {
    const Nf4FrozenWeight w(W0, options(dq));
    const Matrix back = w.dequantized();
    // With double quantization, |c' - c| <= m / 254 (m = the group's largest |c - mean|).
    std::vector<double> c;
    for (Index i = 0; i < W0.rows(); ++i)
      for (Index b = 0; b < blocks; ++b)
        c.push_back(W0.row(i)
                        .segment(b * 64, std::min<Index>(64, W0.cols() - b * 64))
                        .cwiseAbs()
                        .maxCoeff());
    double mean = 0;
    for (double v : c) mean += v;
    mean /= double(c.size());
    double worst = 0;  // largest error as a fraction of the block's absmax
    for (Index i = 0; i < W0.rows(); ++i)
      for (Index b = 0; b < blocks; ++b) {
        const std::size_t flat = std::size_t(i * blocks + b);
        const double ci = c[flat];
        const double scale_err = std::abs(double(w.block_scale(i, b)) - ci);
        if (dq) {
          const std::size_t g0 = flat / 256 * 256, g1 = std::min(c.size(), g0 + 256);
          double m = 0;
          for (std::size_t t = g0; t < g1; ++t) m = std::max(m, std::abs(c[t] - mean));
          ASSERT_LE(scale_err, m / 254 * (1 + 1e-4) + 1e-7 * ci) << "block " << i << ", " << b;
        } else {
          ASSERT_EQ(scale_err, 0.0);
        }
        const double bound = ci * double(nf4::kHalfWidestGap) * (1 + 1e-6) + scale_err;
        for (Index j = b * 64; j < std::min<Index>(W0.cols(), b * 64 + 64); ++j) {
          const double err = std::abs(double(back(i, j)) - double(W0(i, j)));
          ASSERT_LE(err, bound) << "W0(" << i << ", " << j << ") = " << W0(i, j);
          worst = std::max(worst, err / ci);
        }
      }
    // The bound is reached at the table's widest gap, not far below it.
    EXPECT_GT(worst, 0.5 * double(nf4::kHalfWidestGap));
  }
}

TEST(Nf4Memory, BitsPerParameterWithAndWithoutDoubleQuantization) {
  const Matrix W0 = gaussian(256, 4096, 77, 0.02f);
  const Nf4FrozenWeight plain(W0, options(false));
  const Nf4FrozenWeight dq(W0, options(true));
  EXPECT_DOUBLE_EQ(plain.bits_per_parameter(), 4.5);  // 4 + 32 / 64
  // 4 + 8/64 + 32/(64*256) + one fp32 mean: the paper's 4.127.
  EXPECT_NEAR(dq.bits_per_parameter(), 4.0 + 8.0 / 64 + 32.0 / (64 * 256), 1e-4);
  EXPECT_EQ(dq.packed_bytes(), std::size_t(256 * 4096 / 2 + 256 * 64 + 64 * 4 + 4));
  EXPECT_EQ(dq.stored_bytes(), dq.packed_bytes());
}

// ---- products and the layer
// -----------------------------------------------------------------------

class Nf4Products : public ::testing::TestWithParam<bool> {};  // param: double quantization

void check_products_against_fp64(bool double_quant) {
  const Matrix W0 = gaussian(300, 300, 5, 0.05f);
  const Nf4FrozenWeight w(W0, options(double_quant));
  const MatrixD Wq = as_multiplied(w, w.dequantized());
  const Matrix X = gaussian(300, 7, 6), G = gaussian(300, 7, 7);
  const MatrixD Xq = as_multiplied(w, X), Gq = as_multiplied(w, G);
  if (!double_quant) {
    EXPECT_TRUE(w.dequantized() == reference_dequant(W0));
  }

  Matrix H(300, 7);
  H.setConstant(123.0f);  // overwritten
  w.multiply(X, H);
  EXPECT_MATRIX_NEAR(H, Wq * Xq, 1e-5);
  const Matrix H0 = gaussian(300, 7, 8);
  H = H0;
  w.multiply_add(X, H);
  EXPECT_MATRIX_NEAR(H, H0.cast<double>() + Wq * Xq, 1e-5);

  Matrix dX(300, 7);
  dX.setZero();
  w.multiply_transposed_add(G, dX);
  EXPECT_MATRIX_NEAR(dX, Wq.transpose() * Gq, 1e-5);
  dX = H0;
  w.multiply_transposed_add(G, dX);
  EXPECT_MATRIX_NEAR(dX, H0.cast<double>() + Wq.transpose() * Gq, 1e-5);

  // Strided operands (blocks of bigger matrices) and a batch of one.
  Matrix Xbig = gaussian(310, 12, 9), Hbig = Matrix::Zero(305, 12);
  w.multiply(Xbig.block(3, 2, 300, 5), Hbig.block(2, 1, 300, 5));
  EXPECT_MATRIX_NEAR(Hbig.block(2, 1, 300, 5),
                     Wq * as_multiplied(w, Matrix(Xbig.block(3, 2, 300, 5))), 1e-5);
  Vector x1 = gaussian(300, 1, 10), h1(300);
  w.multiply(x1, h1);
  EXPECT_MATRIX_NEAR(h1, Wq * as_multiplied(w, x1), 1e-5);
}

TEST_P(Nf4Products, MatchFp64OnTheDequantizedWeight) {
  // 300 x 300: two row panels for W X and two column panels (256 + 44) for W^T G, on one thread
  // and (with OpenMP) spread over three.
  const int threads_before = Eigen::nbThreads();
  for (int threads : {1, 3}) {
    Eigen::setNbThreads(threads);
    SCOPED_TRACE(threads);
    check_products_against_fp64(GetParam());
  }
  Eigen::setNbThreads(threads_before);
}

TEST_P(Nf4Products, LayerForwardAndGradientsMatchFp64) {
  // The layer on the NF4 base: H = W' X + s B A X, dA = s B^T G X^T, dB = s G (A X)^T,
  // dX = W'^T G + s A^T B^T G, with W' = dequant(W0) (bf16-rounded with X and G for the frozen
  // product on the oneDNN back end).
  const Index d = 96, k = 200, n = 6;
  lora::LoRAConfig cfg;
  cfg.rank = 4;
  cfg.alpha = 8;
  cfg.seed = 3;
  lora::LoRALinear<float, Nf4FrozenWeight> layer(
      Nf4FrozenWeight(gaussian(d, k, 31, 0.05f), options(GetParam())), Vector(), cfg);
  layer.B() = gaussian(d, 4, 32, 0.1f);
  const Matrix X = gaussian(k, n, 33), G = gaussian(d, n, 34);
  const double s = layer.scaling();
  const MatrixD Wq = as_multiplied(layer.frozen(), layer.frozen().dequantized());
  const MatrixD A = layer.A().cast<double>(), B = layer.B().cast<double>();
  const MatrixD Xd = X.cast<double>(), Gd = G.cast<double>();
  const MatrixD Xq = as_multiplied(layer.frozen(), X), Gq = as_multiplied(layer.frozen(), G);

  lora::Workspace<float> ws;
  Matrix H(d, n), dX(k, n);
  layer.forward(X, H, ws);
  EXPECT_MATRIX_NEAR(H, Wq * Xq + s * B * (A * Xd), 1e-5);
  layer.zero_grad();
  layer.backward(X, G, dX, ws);
  EXPECT_MATRIX_NEAR(layer.grad_A(), s * B.transpose() * Gd * Xd.transpose(), 1e-5);
  EXPECT_MATRIX_NEAR(layer.grad_B(), s * Gd * (A * Xd).transpose(), 1e-5);
  EXPECT_MATRIX_NEAR(dX, Wq.transpose() * Gq + s * A.transpose() * (B.transpose() * Gd), 1e-5);
}

TEST(Nf4Products, TallAndWideWeightsAreTiledWithinThePanelBound) {
  // 20000 x 64: a column panel of 64 x 20000 would exceed 2^20 elements, so dX = W^T G runs in
  // two tiles of rows; 16 x 70000: H = W X runs in two tiles of columns (the second ending in a
  // partial block). The tiles must add up to the product, and the buffer stay within 4 MiB.
  const int threads_before = Eigen::nbThreads();
  Eigen::setNbThreads(1);  // the products run on this thread, whose buffer is measured
  for (const auto& [d, k] :
       {std::pair<Index, Index>{20000, 64}, std::pair<Index, Index>{16, 70000}}) {
    SCOPED_TRACE(d);
    const Nf4FrozenWeight w(gaussian(d, k, 41), options(true));
    const MatrixD Wq = as_multiplied(w, w.dequantized());
    const Matrix X = gaussian(k, 3, 42), G = gaussian(d, 3, 43);
    Matrix H(d, 3), dX = Matrix::Zero(k, 3);
    w.multiply(X, H);
    EXPECT_MATRIX_NEAR(H, Wq * as_multiplied(w, X), 1e-5);
    w.multiply_transposed_add(G, dX);
    EXPECT_MATRIX_NEAR(dX, Wq.transpose() * as_multiplied(w, G), 1e-5);
    EXPECT_LE(Nf4FrozenWeight::thread_panel_bytes(), std::size_t(4) << 20);
  }
  Eigen::setNbThreads(threads_before);
}

INSTANTIATE_TEST_SUITE_P(DoubleQuantization, Nf4Products, ::testing::Bool());

TEST(Nf4Merge, MergeBuildsTheFp32WeightAndUnmergeRestoresW0Exactly) {
  const Index d = 40, k = 150, r = 3;
  const Nf4FrozenWeight original(gaussian(d, k, 41, 0.05f));
  Nf4FrozenWeight w = original;
  const Matrix B = gaussian(d, r, 42, 0.1f), A = gaussian(r, k, 43, 0.1f);
  const Vector g = gaussian(d, 1, 44).cwiseAbs();
  const float s = 1.5f;
  const MatrixD Wq = w.dequantized().cast<double>();
  const MatrixD expect = Wq + double(s) * B.cast<double>() * A.cast<double>();

  EXPECT_MATRIX_NEAR(w.merged_weight(s, B, A), expect, 1e-6);
  EXPECT_FALSE(w.is_merged());
  w.merge(s, B, A, g);
  EXPECT_TRUE(w.is_merged());
  EXPECT_MATRIX_NEAR(w.weight(), g.cast<double>().asDiagonal() * expect, 1e-6);
  EXPECT_EQ(w.stored_bytes(), w.packed_bytes() + std::size_t(d * k) * sizeof(float));
  EXPECT_THROW(w.merge(s, B, A, g), std::logic_error);
  Eigen::VectorXd norms(d);
  EXPECT_THROW(w.row_norms(norms), std::logic_error);

  // While merged the products use the merged weight.
  const Matrix X = gaussian(k, 5, 45);
  Matrix H(d, 5);
  w.multiply(X, H);
  EXPECT_MATRIX_NEAR(H, g.cast<double>().asDiagonal() * expect * X.cast<double>(), 1e-5);

  w.unmerge(s, B, A, g);
  EXPECT_FALSE(w.is_merged());
  EXPECT_THROW(w.unmerge(s, B, A, g), std::logic_error);
  EXPECT_TRUE(w.weight() == original.dequantized());  // bit for bit
  EXPECT_EQ(w.stored_bytes(), original.stored_bytes());
  for (Index i = 0; i < d; ++i)
    for (Index j = 0; j < k; ++j) ASSERT_EQ(w.code(i, j), original.code(i, j));

  w.row_norms(norms);
  EXPECT_MATRIX_NEAR(norms, Wq.rowwise().norm(), 1e-12);
}

TEST(Nf4Merge, RefusesBadShapesAndOverflowLeavingW0) {
  Nf4FrozenWeight w(gaussian(8, 64, 51));
  const Matrix B = Matrix::Constant(8, 2, 1e30f), A = Matrix::Constant(2, 64, 1e30f);
  EXPECT_THROW(w.merge(1.0f, B, A), std::domain_error);
  EXPECT_FALSE(w.is_merged());
  EXPECT_TRUE(w.all_finite());
  EXPECT_THROW(w.merge(1.0f, Matrix::Zero(7, 2), Matrix::Zero(2, 64)), std::invalid_argument);
  EXPECT_THROW(w.merge(1.0f, Matrix::Zero(8, 2), Matrix::Zero(2, 64), Vector::Ones(3)),
               std::invalid_argument);
}

TEST(Nf4Merge, LayerMergeMatchesUnmergedForward) {
  lora::LoRAConfig cfg;
  cfg.rank = 4;
  cfg.alpha = 8;
  lora::LoRALinear<float, Nf4FrozenWeight> layer(Nf4FrozenWeight(gaussian(32, 96, 61, 0.05f)),
                                                 Vector(), cfg);
  layer.B() = gaussian(32, 4, 62, 0.1f);
  const Matrix X = gaussian(96, 5, 63);
  const Matrix unmerged = layer.forward(X);
  const Matrix before = layer.weight();
  layer.merge();
  // Merged: an fp32 product; unmerged on the oneDNN back end rounds X to bf16 (relative 2^-8).
  const double tol = rounds_to_bf16(layer.frozen()) ? 1e-2 : 1e-5;
  EXPECT_MATRIX_NEAR(layer.forward(X), unmerged.cast<double>(), tol);
  layer.unmerge();
  EXPECT_TRUE(layer.weight() == before);
}

TEST(Nf4Storage, CopiesShareNothingAndProductsAllocateNothingInSteadyState) {
  // 300 x 300: two panels per product, spread over two threads with OpenMP.
  const Matrix W0 = gaussian(300, 300, 71, 0.05f);
  Nf4FrozenWeight a(W0);
  const Nf4FrozenWeight b = a;  // a copy
  a.merge(1.0f, Matrix::Ones(300, 1), Matrix::Ones(1, 300));
  EXPECT_FALSE(b.is_merged());
  EXPECT_TRUE(b.weight() == Nf4FrozenWeight(W0).weight());
  a.unmerge(1.0f, Matrix::Ones(300, 1), Matrix::Ones(1, 300));

  const int threads_before = Eigen::nbThreads();
  Eigen::setNbThreads(2);
  const Matrix X = gaussian(300, 16, 72), G = gaussian(300, 16, 73);
  Matrix H(300, 16), dX(300, 16);
  auto step = [&] {
    a.multiply(X, H);
    a.multiply_add(X, H);
    a.multiply_transposed_add(G, dX);
  };
  step();  // grows the per-thread panels and creates any cached primitive
  // Every buffer of the storage is an Eigen vector: the guard sees each of its allocations.
  Eigen::internal::set_is_malloc_allowed(false);
  EXPECT_NO_THROW(for (int t = 0; t < 3; ++t) step());
  Eigen::internal::set_is_malloc_allowed(true);
  Eigen::setNbThreads(threads_before);
  EXPECT_EQ(a.allocation_free(), a.backend() == lora::Nf4Backend::Portable);
}

TEST(Nf4Storage, ReportsItsBackend) {
  const Nf4FrozenWeight w(Matrix::Ones(4, 4));
  EXPECT_EQ(w.backend() == lora::Nf4Backend::OneDnn, Nf4FrozenWeight::onednn_available());
  EXPECT_FALSE(Nf4FrozenWeight::backend_report().empty());
  Nf4Options portable;
  portable.backend = lora::Nf4Backend::Portable;
  EXPECT_EQ(Nf4FrozenWeight(Matrix::Ones(4, 4), portable).backend(), lora::Nf4Backend::Portable);
  if (!Nf4FrozenWeight::onednn_available()) {
    Nf4Options onednn;
    onednn.backend = lora::Nf4Backend::OneDnn;
    EXPECT_THROW(Nf4FrozenWeight(Matrix::Ones(4, 4), onednn), std::invalid_argument);
  }
}

}  // namespace nf4_test
