// lora::compiled: a file built in compiled mode (LORA_EXTERN_TEMPLATES, set by the target) links
// the instantiations from the static library; a LoRA layer, an NF4 layer and a PEFT round trip
// give the dense formula's outputs.
#include <lora/lora.hpp>

#if !defined(LORA_EXTERN_TEMPLATES)
#error "lora::compiled must define LORA_EXTERN_TEMPLATES"
#endif

#include <iostream>
#include <map>
#include <string>

int main() {
  Eigen::MatrixXf W0 = Eigen::MatrixXf::Random(48, 40);
  lora::LoRAConfig cfg;
  cfg.rank = 4;
  lora::LoRALinear<float> trained(W0, cfg), fresh(W0, cfg);
  trained.B().setRandom();
  lora::peft::save_adapter("consumer_compiled_adapter", {{"fc", &trained}});
  lora::peft::load_adapter("consumer_compiled_adapter", {{"fc", &fresh}});
  const Eigen::MatrixXf X = Eigen::MatrixXf::Random(40, 24);
  const Eigen::MatrixXf expected = W0 * X + trained.scaling() * trained.B() * (trained.A() * X);
  bool ok = fresh.forward(X).isApprox(expected, 1e-5f);
  lora::LoRALinear<float, lora::Nf4FrozenWeight> nf4(lora::Nf4FrozenWeight(W0), {}, cfg);
  ok = ok && nf4.forward(X).isApprox(nf4.frozen().weight() * X, 1e-5f);  // B = 0
  std::cout << (ok ? "consumer ok" : "consumer MISMATCH") << "\n";
  return ok ? 0 : 1;
}
