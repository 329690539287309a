// detail::gemm_add (Eigen's kernel with caller-kept packing buffers) against a plain fp64 product,
// for every operand layout, odd shapes, strided blocks, and 1 or 2 threads.
#include <lora/detail/gemm.hpp>
#include <lora/lora.hpp>

#include <gtest/gtest.h>

#include <Eigen/Core>

#include <cstdlib>

namespace {

using MatF = Eigen::MatrixXf;
using MatD = Eigen::MatrixXd;

// |C - C_ref| <= gamma_{depth+2} (|alpha| |L||R| + |C0|) elementwise, with a 2x margin.
void expect_close(const MatF& C, const MatD& ref, const MatD& scale, Eigen::Index depth) {
  const double v = 1.0 / 16777216.0;
  const double gamma = (depth + 2) * v / (1 - (depth + 2) * v);
  const MatD err = (C.cast<double>() - ref).cwiseAbs();
  EXPECT_TRUE((err.array() <= 2 * gamma * scale.array() + 1e-30).all())
      << "max error " << err.maxCoeff() << ", depth " << depth;
}

struct Case {
  int rows, cols, depth;
};

class GemmTest : public ::testing::TestWithParam<std::tuple<Case, int>> {};

TEST_P(GemmTest, AllLayoutsMatchAPlainProduct) {
  const auto [c, threads] = GetParam();
  Eigen::setNbThreads(threads);
  std::srand(unsigned(c.rows * 131 + c.cols * 17 + c.depth));
  const float alpha = 0.75f;
  const MatF L = MatF::Random(c.rows, c.depth), R = MatF::Random(c.depth, c.cols);
  const MatF Lt = L.transpose(), Rt = R.transpose();  // stored transposed: read row-major
  const MatF C0 = MatF::Random(c.rows, c.cols);
  const MatD ref = C0.cast<double>() + alpha * L.cast<double>() * R.cast<double>();
  const MatD scale = C0.cast<double>().cwiseAbs() +
                     alpha * L.cast<double>().cwiseAbs() * R.cast<double>().cwiseAbs();

  MatF C = C0;
  lora::detail::gemm_add(C, L, R, alpha);
  expect_close(C, ref, scale, c.depth);
  C = C0;
  lora::detail::gemm_add(C, Lt.transpose(), R, alpha);
  expect_close(C, ref, scale, c.depth);
  C = C0;
  lora::detail::gemm_add(C, L, Rt.transpose(), alpha);
  expect_close(C, ref, scale, c.depth);
  C = C0;
  lora::detail::gemm_add(C, Lt.transpose(), Rt.transpose(), alpha);
  expect_close(C, ref, scale, c.depth);

  // Strided operands and output: blocks inside larger matrices (padding must stay untouched).
  MatF bigL = MatF::Random(c.rows + 3, c.depth + 2), bigR = MatF::Random(c.depth + 5, c.cols + 1);
  bigL.block(1, 2, c.rows, c.depth) = L;
  bigR.block(4, 0, c.depth, c.cols) = R;
  MatF bigC = MatF::Constant(c.rows + 2, c.cols + 2, 7.0f);
  bigC.block(2, 1, c.rows, c.cols) = C0;
  Eigen::Ref<MatF> Cblock = bigC.block(2, 1, c.rows, c.cols);
  lora::detail::gemm_add(Cblock, bigL.block(1, 2, c.rows, c.depth),
                         bigR.block(4, 0, c.depth, c.cols), alpha);
  expect_close(bigC.block(2, 1, c.rows, c.cols), ref, scale, c.depth);
  EXPECT_TRUE((bigC.topRows(2).array() == 7.0f).all());
  EXPECT_TRUE((bigC.leftCols(1).array() == 7.0f).all());
  Eigen::setNbThreads(0);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GemmTest,
    ::testing::Combine(::testing::Values(Case{1, 1, 1}, Case{3, 4, 5}, Case{1, 37, 50},
                                         Case{41, 1, 300}, Case{8, 513, 129}, Case{300, 8, 517},
                                         Case{97, 65, 33}, Case{260, 130, 600}),
                       ::testing::Values(1, 2)));

}  // namespace
