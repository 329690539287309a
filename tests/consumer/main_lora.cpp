// lora::lora: the core header on Eigen alone.
#include <lora/core.hpp>

#include <iostream>

int main() {
  Eigen::MatrixXf W0 = Eigen::MatrixXf::Random(6, 5);
  lora::LoRAConfig cfg;
  cfg.rank = 2;
  lora::LoRALinear<float> layer(W0, cfg);
  Eigen::MatrixXf X = Eigen::MatrixXf::Random(5, 3);
  const Eigen::MatrixXf H = layer.forward(X);
  const bool ok = H.isApprox(W0 * X);  // B starts at zero: the layer equals the base
  std::cout << (ok ? "consumer ok" : "consumer MISMATCH") << "\n";
  return ok ? 0 : 1;
}
