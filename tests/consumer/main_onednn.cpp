// lora::onednn: a layer whose frozen products run on oneDNN.
#include <lora/core.hpp>
#include <lora/onednn/onednn_frozen_weight.hpp>

#include <iostream>

int main() {
  Eigen::MatrixXf W0 = Eigen::MatrixXf::Random(6, 5);
  lora::LoRAConfig cfg;
  cfg.rank = 2;
  lora::LoRALinear<float, lora::onednn::OneDnnFrozenWeight> layer(W0, cfg);
  Eigen::MatrixXf X = Eigen::MatrixXf::Random(5, 3);
  const Eigen::MatrixXf H = layer.forward(X);
  const bool ok = H.isApprox(W0 * X, 1e-5f);  // B starts at zero: the layer equals the base
  std::cout << (ok ? "consumer ok" : "consumer MISMATCH") << "\n";
  return ok ? 0 : 1;
}
