// The fp32 oneDNN frozen weight against a plain fp64 computation: forward, backward, merge.
#include <lora/lora.hpp>
#include <lora/onednn/onednn_frozen_weight.hpp>

#include <gtest/gtest.h>

#include <Eigen/Core>

#include <cstdlib>
#include <cstring>

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

TEST(OneDnnFrozenWeight, ForwardBackwardAndMergeMatchFp64) {
  for (const int n : {1, 5, 64}) {
    const int d = 70, k = 300, r = 4;
    std::srand(unsigned(n));
    const MatF W = MatF::Random(d, k), X = MatF::Random(k, n), G = MatF::Random(d, n);
    const MatF A = MatF::Random(r, k), B = MatF::Random(d, r);
    const Eigen::VectorXf b = Eigen::VectorXf::Random(d);
    lora::LoRAConfig cfg;
    cfg.rank = r;
    Layer layer(W, b, cfg);
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
  }
}

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
