// DenseFrozenWeight on a BLAS (lora::blas): each kernel built in, forced, against a plain product
// in double at shapes where the BLAS really blocks (odd sizes, strided operands, n = 1, both
// orientations, overwrite and accumulate); the Auto rule's report; steady-state allocations at a
// real shape. The conformance battery runs on the same kernels in this binary
// (test_conformance.cpp with LORA_CONFORMANCE_BLAS_ONLY).
#include "alloc_counter.hpp"

#include <lora/lora.hpp>

#include <gtest/gtest.h>

#include <Eigen/Core>

#include <limits>
#include <string>
#include <vector>

namespace test_dense_blas {
namespace {

using lora::DenseKernel;

std::vector<DenseKernel> built_blas() {
  std::vector<DenseKernel> out;
  for (DenseKernel k : {DenseKernel::OpenBlas, DenseKernel::Blis})
    if (lora::detail::dense_kernel_built(k)) out.push_back(k);
  return out;
}

// |C - C_ref| <= gamma_{depth+2} (|W||R| + |C0|) elementwise, with a 4x margin (u of T).
template <typename T>
void expect_close(const Eigen::MatrixXd& C, const Eigen::MatrixXd& ref,
                  const Eigen::MatrixXd& scale, Eigen::Index depth, const char* what) {
  const double u = std::numeric_limits<T>::epsilon() / 2;
  const double gamma = (depth + 2) * u / (1 - (depth + 2) * u);
  const Eigen::MatrixXd err = (C - ref).cwiseAbs();
  EXPECT_TRUE((err.array() <= 4 * gamma * scale.array() + 1e-300).all())
      << what << ": max error " << err.maxCoeff();
}

template <typename T>
void check_kernel(DenseKernel kernel, Eigen::Index d, Eigen::Index k, Eigen::Index n) {
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  std::srand(unsigned(d * 7 + k * 3 + n));
  const Mat W = Mat::Random(d, k);
  const lora::DenseFrozenWeight<T> frozen(W, lora::MergeMode::InPlace, kernel);
  const Eigen::MatrixXd Wd = W.template cast<double>();
  for (int transposed = 0; transposed < 2; ++transposed) {
    const Eigen::Index in = transposed ? d : k, out = transposed ? k : d;
    // Operands are blocks of larger matrices: outer strides differ from the row counts.
    Mat Xbig = Mat::Random(in + 3, n + 1), Hbig = Mat::Random(out + 5, n + 2);
    auto X = Xbig.block(1, 0, in, n);
    auto H = Hbig.block(2, 1, out, n);
    const Eigen::MatrixXd Xd = X.template cast<double>();
    const Eigen::MatrixXd WX = transposed ? Eigen::MatrixXd(Wd.transpose() * Xd) : Wd * Xd;
    const Eigen::MatrixXd scale = transposed
                                      ? Eigen::MatrixXd(Wd.cwiseAbs().transpose() * Xd.cwiseAbs())
                                      : Eigen::MatrixXd(Wd.cwiseAbs() * Xd.cwiseAbs());
    const Eigen::MatrixXd H0 = H.template cast<double>();
    const Mat Hbig_before = Hbig;
    if (transposed) {
      frozen.multiply_transposed_add(X, H);
      expect_close<T>(H.template cast<double>(), H0 + WX, scale + H0.cwiseAbs(), in, "dX += W^T G");
    } else {
      H.setConstant(std::numeric_limits<T>::quiet_NaN());  // overwritten, never read
      frozen.multiply(X, H);
      expect_close<T>(H.template cast<double>(), WX, scale, in, "H = W X");
      H = H0.template cast<T>();
      frozen.multiply_add(X, H);
      expect_close<T>(H.template cast<double>(), H0 + WX, scale + H0.cwiseAbs(), in, "H += W X");
    }
    // Nothing outside the block was written.
    Mat outside = Hbig, before = Hbig_before;
    outside.block(2, 1, out, n).setZero();
    before.block(2, 1, out, n).setZero();
    EXPECT_TRUE(outside == before);
  }
}

TEST(DenseBlas, EveryKernelMatchesAPlainProduct) {
  for (DenseKernel kernel : built_blas()) {
    SCOPED_TRACE(lora::detail::dense_kernel_name(kernel));
    for (int threads : {1, 2}) {
      Eigen::setNbThreads(threads);
      for (Eigen::Index n : {1, 2, 37}) {
        check_kernel<float>(kernel, 301, 257, n);
        check_kernel<double>(kernel, 129, 300, n);
      }
    }
  }
  Eigen::setNbThreads(1);
}

TEST(DenseBlas, BackendReportNamesTheKernelOfEachProduct) {
  const Eigen::MatrixXf W = Eigen::MatrixXf::Random(512, 384);  // 768 KiB
  lora::DenseFrozenWeight<float> frozen(W);
  const std::string before = frozen.backend_report();
  EXPECT_NE(before.find("H = W X (512 x 384): not run yet"), std::string::npos) << before;
  Eigen::MatrixXf X = Eigen::MatrixXf::Random(384, 8), H(512, 8),
                  G = Eigen::MatrixXf::Random(512, 1), dX = Eigen::MatrixXf::Zero(384, 1);
  frozen.multiply(X, H);
  frozen.multiply_transposed_add(G, dX);
  const std::string report = frozen.backend_report();
  const auto batched = lora::detail::choose_dense_kernel(
      DenseKernel::Auto, lora::DenseProduct::Multiply, 512, 384, 8, sizeof(float));
  EXPECT_NE(report.find(std::string("H = W X (512 x 384, n = 8): ") +
                        lora::detail::dense_kernel_name(batched.kernel) + " (" + batched.why),
            std::string::npos)
      << report;
  // n = 1 reads W once: Eigen's GEMV, whatever is built in.
  EXPECT_NE(report.find("dX += W^T G (512 x 384, n = 1): Eigen ("), std::string::npos) << report;
  EXPECT_NE(report.find("H += W X (512 x 384): not run yet"), std::string::npos) << report;
  EXPECT_NE(report.find("built in: Eigen "), std::string::npos) << report;
  // A small weight stays on Eigen (the battery's 7 x 5 runs Auto through Eigen's kernel).
  const auto small = lora::detail::choose_dense_kernel(DenseKernel::Auto,
                                                       lora::DenseProduct::Multiply, 7, 5, 8, 4);
  EXPECT_EQ(small.kernel, DenseKernel::Eigen);
}

TEST(DenseBlas, ForcedKernelsAllocateNothingInSteadyState) {
  if (!lora::test::allocation_counter_available())
    GTEST_SKIP() << "allocations are not counted in sanitizer builds";
  for (DenseKernel kernel : built_blas()) {
    SCOPED_TRACE(lora::detail::dense_kernel_name(kernel));
    for (int threads : {1, 2}) {
      Eigen::setNbThreads(threads);
      const lora::DenseFrozenWeight<float> frozen(Eigen::MatrixXf::Random(384, 512),
                                                  lora::MergeMode::InPlace, kernel);
      if (!frozen.allocation_free()) continue;  // BLIS: documented to allocate per call
      const Eigen::MatrixXf X = Eigen::MatrixXf::Random(512, 64),
                            G = Eigen::MatrixXf::Random(384, 64);
      Eigen::MatrixXf H(384, 64), dX(512, 64);
      auto round = [&] {
        frozen.multiply(X, H);
        frozen.multiply_add(X, H);
        frozen.multiply_transposed_add(G, dX);
        frozen.multiply(X.col(0), H.col(0));
      };
      round();
      const auto before = lora::test::allocation_count();
      round();
      EXPECT_EQ(lora::test::allocation_count() - before, 0u) << threads << " threads";
    }
  }
  Eigen::setNbThreads(1);
}

}  // namespace
}  // namespace test_dense_blas
