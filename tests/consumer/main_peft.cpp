// lora::peft: an adapter saved as a PEFT directory and loaded into a fresh layer gives the same
// output.
#include <lora/peft.hpp>

#include <cstdio>
#include <iostream>
#include <map>
#include <string>

int main() {
  Eigen::MatrixXf W0 = Eigen::MatrixXf::Random(6, 5);
  lora::LoRAConfig cfg;
  cfg.rank = 2;
  lora::LoRALinear<float> trained(W0, cfg), fresh(W0, cfg);
  trained.B().setRandom();  // B starts at zero: give the adapter something to carry
  const std::string dir = "consumer_adapter";
  lora::peft::save_adapter(dir,
                           std::map<std::string, const lora::LoRALinear<float>*>{{"fc", &trained}});
  lora::peft::load_adapter(dir, std::map<std::string, lora::LoRALinear<float>*>{{"fc", &fresh}});
  Eigen::MatrixXf X = Eigen::MatrixXf::Random(5, 3);
  const bool ok = fresh.forward(X).isApprox(trained.forward(X));
  std::cout << (ok ? "consumer ok" : "consumer MISMATCH") << "\n";
  return ok ? 0 : 1;
}
