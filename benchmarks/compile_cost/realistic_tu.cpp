// A realistic user translation unit for the compile-cost table (scripts/compile_cost): what a
// trainer's main file does with lora. PEFT adapter I/O, an NF4 and a bf16 base, DoRA, LoRA on
// float and double layers, a MultiLoRALinear, AdamW with clipping and a schedule, optimizer
// state. Its compile cost is the figure; built with -DLORA_EXTERN_TEMPLATES (and linked with
// lora::compiled) it is the compiled mode's figure. The test suite builds it that way and runs it
// (compiled_mode_realistic_tu), so that a body missing from the library fails a link.
#include <lora/lora.hpp>

#include <Eigen/Core>

#include <iostream>
#include <map>
#include <string>

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "adapter";
  Eigen::MatrixXf W1 = Eigen::MatrixXf::Random(64, 32), W2 = Eigen::MatrixXf::Random(8, 64);
  lora::LoRAConfig cfg;
  cfg.rank = 4;
  cfg.use_dora = true;
  lora::LoRALinear<float, lora::Nf4FrozenWeight> fc1(lora::Nf4FrozenWeight(W1), {}, cfg);
  cfg.use_dora = false;
  lora::LoRALinear<float, lora::Bf16FrozenWeight> fc2(lora::Bf16FrozenWeight(W2), {}, cfg);
  lora::LoRALinear<float> dense(W2, cfg);
  lora::LoRALinear<double> precise(W2.cast<double>(), cfg);
  lora::MultiLoRALinear<float> multi(W2);
  multi.add_adapter("a", cfg);
  multi.add_adapter("b", cfg);

  auto params = fc1.parameters();
  for (auto& p : fc2.parameters()) params.push_back(p);
  lora::AdamW<float> opt(params);
  const auto schedule = lora::LRSchedule::cosine_with_warmup(1e-3, 10, 100);
  lora::Workspace<float> ws;
  Eigen::MatrixXf X = Eigen::MatrixXf::Random(32, 16), H1(64, 16), H2(8, 16), dH(64, 16);
  for (int step = 0; step < 3; ++step) {
    fc1.forward(X, H1, ws);
    fc2.forward(H1, H2, ws);
    opt.zero_grad();
    fc2.backward(H1, H2, dH, ws);
    fc1.backward_without_input_grad(X, dH, ws);
    lora::clip_grad_norm(params, 1.0f);
    schedule.apply(opt);
    opt.step();
  }
  const Eigen::MatrixXf Y = dense.forward(H1) + multi.forward(H1);
  const Eigen::MatrixXd Yd = precise.forward(H1.cast<double>());
  lora::peft::save_adapter(dir + "/fc1", {{"fc1", &fc1}});
  lora::peft::save_adapter(dir + "/fc2", {{"fc2", &fc2}});
  lora::save_optimizer_state(dir + "/fc1/optimizer.safetensors", opt);
  auto layers = lora::peft::make_layers<float, lora::Nf4FrozenWeight>(dir + "/fc1", {{"fc1", W1}});
  auto multis = lora::peft::make_multi_layers<float>(dir + "/fc2", {{"fc2", W2}}, "task");
  std::cout << lora::summary(layers) << " " << lora::summary(multis) << " " << Y.sum() + Yd.sum()
            << "\n";
  return 0;
}
