// lora::blas: a layer whose dense products run on the BLAS lora was built with.
#include <lora/core.hpp>

#include <iostream>

int main() {
  Eigen::MatrixXf W0 = Eigen::MatrixXf::Random(300, 200);
  lora::LoRAConfig cfg;
  cfg.rank = 2;
  lora::LoRALinear<float> layer(W0, cfg);
  Eigen::MatrixXf X = Eigen::MatrixXf::Random(200, 16);
  const Eigen::MatrixXf H = layer.forward(X);
  const bool ok = H.isApprox(W0 * X, 1e-5f);  // B starts at zero: the layer equals the base
  std::cout << layer.frozen().backend_report() << "\n"
            << (ok ? "consumer ok" : "consumer MISMATCH") << "\n";
  return ok && lora::detail::dense_blas_kernel() != lora::DenseKernel::Eigen ? 0 : 1;
}
