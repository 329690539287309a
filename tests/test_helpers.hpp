// Shared test utilities: a matrix comparison that prints both sides, fixture loading and finite
// differences.
#pragma once

#include <gtest/gtest.h>
#include <lora/io/safetensors.hpp>

#include <Eigen/Core>

#include <cmath>
#include <fstream>
#include <sstream>
#include <string>

namespace lora::test {

inline std::string fixture_path(const std::string& relative) {
  return std::string(LORA_FIXTURE_DIR) + "/" + relative;
}

/// max |a - b| / max(max |b|, tiny): the relative error of a against the reference b.
template <typename A, typename B>
double relative_error(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  const double scale = std::max(b.template cast<double>().cwiseAbs().maxCoeff(), 1e-300);
  return (a.template cast<double>() - b.template cast<double>()).cwiseAbs().maxCoeff() / scale;
}

/// Passes when a and b have the same shape and relative_error(a, b) <= tol; otherwise prints both.
template <typename A, typename B>
::testing::AssertionResult MatrixNear(const char* a_expr, const char* b_expr, const char*,
                                      const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b,
                                      double tol) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) {
    return ::testing::AssertionFailure()
           << a_expr << " is " << a.rows() << " x " << a.cols() << " but " << b_expr << " is "
           << b.rows() << " x " << b.cols();
  }
  const double err = relative_error(a, b);
  if (err <= tol) return ::testing::AssertionSuccess();
  std::ostringstream s;
  if (a.size() <= 64) {
    s << "\n" << a_expr << " =\n" << a << "\n" << b_expr << " =\n" << b;
  }
  return ::testing::AssertionFailure() << "relative error of " << a_expr << " against " << b_expr
                                       << " is " << err << ", above " << tol << s.str();
}

#define EXPECT_MATRIX_NEAR(a, b, tol) EXPECT_PRED_FORMAT3(::lora::test::MatrixNear, a, b, tol)
#define ASSERT_MATRIX_NEAR(a, b, tol) ASSERT_PRED_FORMAT3(::lora::test::MatrixNear, a, b, tol)

/// Central finite-difference gradient of a scalar function f with respect to every element of p
/// (p is perturbed in place and restored): d f / d p_ij ~ (f(p + h e_ij) - f(p - h e_ij)) / 2h.
/// p is any double matrix or vector (an Eigen::MatrixXd, a bias Eigen::VectorXd).
template <typename Param, typename F>
Eigen::MatrixXd numeric_gradient(Param& p, F f, double h = 1e-6) {
  Eigen::MatrixXd g(p.rows(), p.cols());
  for (Eigen::Index j = 0; j < p.cols(); ++j)
    for (Eigen::Index i = 0; i < p.rows(); ++i) {
      const double saved = p(i, j);
      p(i, j) = saved + h;
      const double up = f();
      p(i, j) = saved - h;
      const double down = f();
      p(i, j) = saved;
      g(i, j) = (up - down) / (2 * h);
    }
  return g;
}

inline std::vector<std::uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace lora::test
