// The fp32 oneDNN frozen weight against a plain fp64 computation: forward, backward, merge.
#include <lora/lora.hpp>
#include <lora/onednn/onednn_frozen_weight.hpp>

#include <gtest/gtest.h>

#include <Eigen/Core>

#include <cstdlib>
#include <cstring>
#include <string>

namespace test_onednn {
namespace {

using MatF = Eigen::MatrixXf;
using MatD = Eigen::MatrixXd;
using Layer = lora::LoRALinear<float, lora::onednn::OneDnnFrozenWeight>;

void expect_close(const MatF& got, const MatD& ref, const MatD& scale, double terms) {
  const double v = 1.0 / 16777216.0, gamma = terms * v / (1 - terms * v);
  const MatD err = (got.cast<double>() - ref).cwiseAbs();
  EXPECT_TRUE((err.array() <= 2 * gamma * scale.array()).all()) << "max error " << err.maxCoeff();
}

// Both weight layouts; with the prepacked one the merge and unmerge between the products check
// that the packed copy follows the weight.
class OneDnnLayouts : public ::testing::TestWithParam<lora::onednn::WeightLayout> {};

TEST_P(OneDnnLayouts, ForwardBackwardAndMergeMatchFp64) {
  for (const int n : {1, 5, 64}) {
    const int d = 70, k = 300, r = 4;
    std::srand(unsigned(n));
    const MatF W = MatF::Random(d, k), X = MatF::Random(k, n), G = MatF::Random(d, n);
    const MatF A = MatF::Random(r, k), B = MatF::Random(d, r);
    const Eigen::VectorXf b = Eigen::VectorXf::Random(d);
    lora::LoRAConfig cfg;
    cfg.rank = r;
    Layer layer(lora::onednn::OneDnnFrozenWeight(W, lora::MergeMode::InPlace, GetParam()), b, cfg);
    layer.set_adapter_weights(A, B);
    const double s = layer.scaling();
    const MatD Wd = W.cast<double>(), Xd = X.cast<double>(), Gd = G.cast<double>();
    const MatD Ad = A.cast<double>(), Bd = B.cast<double>();
    const MatD aW = Wd.cwiseAbs(), aX = Xd.cwiseAbs(), aG = Gd.cwiseAbs();
    const MatD aA = Ad.cwiseAbs(), aB = Bd.cwiseAbs();

    const MatD H_ref = (Wd * Xd + s * Bd * (Ad * Xd)).colwise() + b.cast<double>();
    const MatD H_scale = (aW * aX + s * aB * (aA * aX)).colwise() + b.cast<double>().cwiseAbs();
    // Twice, so the second call runs on the cached primitive.
    for (int rep = 0; rep < 2; ++rep) expect_close(layer.forward(X), H_ref, H_scale, k + r + 4);

    const MatF dX = layer.backward(X, G);
    expect_close(dX, Wd.transpose() * Gd + s * Ad.transpose() * (Bd.transpose() * Gd),
                 aW.transpose() * aG + s * aA.transpose() * (aB.transpose() * aG), d + r + 4);

    layer.merge();
    expect_close(layer.forward(X), H_ref, H_scale, k + r + 8);
    layer.unmerge();
    // Unmerged again: the plain W0 (W0 + sBA - sBA, to fp32 rounding), not the merged weight.
    const MatD W0_ref = (Wd * Xd).colwise() + b.cast<double>();
    layer.set_adapter_weights(MatF::Zero(r, k), B);
    expect_close(layer.forward(X), W0_ref, H_scale, k + r + 16);
  }
  if (GetParam() == lora::onednn::WeightLayout::Prepacked) {
    lora::onednn::OneDnnFrozenWeight w(MatF::Random(8, 6), lora::MergeMode::InPlace, GetParam());
    MatF H(8, 3);
    w.multiply(MatF::Random(6, 3), H);
    EXPECT_NE(w.product_report().find("prepacked): "), std::string::npos) << w.product_report();
    EXPECT_GE(w.stored_bytes(), 2 * 8 * 6 * sizeof(float));  // W and its packed copy
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, OneDnnLayouts,
                         ::testing::Values(lora::onednn::WeightLayout::Strided,
                                           lora::onednn::WeightLayout::Prepacked),
                         [](const auto& info) {
                           return info.param == lora::onednn::WeightLayout::Strided
                                      ? std::string("Strided")
                                      : std::string("Prepacked");
                         });

TEST(OneDnnFrozenWeight, StridedOutputsAndReport) {
  const MatF W = MatF::Random(20, 30), X = MatF::Random(30, 6);
  lora::onednn::OneDnnFrozenWeight w(W);
  MatF big = MatF::Constant(25, 8, 3.0f);
  w.multiply(X, big.block(2, 1, 20, 6));
  const MatD ref = W.cast<double>() * X.cast<double>();
  expect_close(big.block(2, 1, 20, 6), ref,
               W.cast<double>().cwiseAbs() * X.cast<double>().cwiseAbs(), 34);
  EXPECT_TRUE((big.topRows(2).array() == 3.0f).all());
  EXPECT_TRUE((big.col(0).array() == 3.0f).all());
  EXPECT_NE(lora::onednn::OneDnnFrozenWeight::backend_report().find("oneDNN"), std::string::npos);
}

}  // namespace
}  // namespace test_onednn
