// A two-layer MLP fine-tuned on two kinds of frozen base, saved and rebuilt from the files:
//   y = fc2(relu(fc1(x))),  fc1: DoRA on a 4-bit NF4 base (QLoRA-style), fc2: LoRA on a bf16 base.
// It trains with AdamW, gradient clipping and a cosine schedule with warm-up, saves each layer's
// adapter as a PEFT directory (two of them: PEFT has one use_dora per adapter file) plus the
// optimizer state, rebuilds both layers with peft::make_layers onto the same kinds of base, and
// checks that the rebuilt model gives the trained model's outputs bit for bit. Exits 1 if not.
//   ./newcomer_mlp [output folder]     (default: ./newcomer_mlp_out)
#include <lora/lora.hpp>

#include <Eigen/Core>

#include <cstdio>
#include <iostream>
#include <string>

int main(int argc, char** argv) {
  const std::string out = argc > 1 ? argv[1] : "newcomer_mlp_out";
  using Matrix = Eigen::MatrixXf;
  const int in = 32, hidden = 64, classes = 4, batch = 16, steps = 60;

  // The frozen base: W0 out x in (torch.nn.Linear.weight's layout), as loaded from a checkpoint.
  lora::Rng rng(2024);
  Matrix W1(hidden, in), W2(classes, hidden);
  lora::fill_normal(W1, rng, 0.0, 0.2);
  lora::fill_normal(W2, rng, 0.0, 0.2);
  const Eigen::VectorXf b1 = Eigen::VectorXf::Zero(hidden);

  lora::LoRAConfig dora;
  dora.rank = 8;
  dora.alpha = 16;
  dora.use_dora = true;
  dora.seed = 1;
  lora::LoRAConfig plain = dora;
  plain.use_dora = false;
  plain.rank = 4;  // fc2 is 4 x 64: r <= min(d, k)
  plain.alpha = 8;
  plain.seed = 2;
  lora::LoRALinear<float, lora::Nf4FrozenWeight> fc1(lora::Nf4FrozenWeight(W1), b1, dora);
  lora::LoRALinear<float, lora::Bf16FrozenWeight> fc2(lora::Bf16FrozenWeight(W2), {}, plain);
  std::cout << lora::summary({{"fc1", &fc1}, {"fc2", &fc2}}) << "\n";

  // A task: the class is the sign pattern of two fixed projections of x.
  Matrix P(2, in);
  lora::fill_normal(P, rng, 0.0, 1.0);
  auto params = fc1.parameters();
  for (auto& p : fc2.parameters()) params.push_back(p);
  lora::AdamWOptions adam;
  adam.lr = 1e-2;
  lora::AdamW<float> opt(params, adam);
  const auto schedule = lora::LRSchedule::cosine_with_warmup(adam.lr, 5, steps);
  lora::Workspace<float> ws1, ws2;
  Matrix X(in, batch), Z(hidden, batch), A(hidden, batch), H(classes, batch), G(classes, batch),
      dA(hidden, batch);
  float first_loss = 0, loss = 0;
  for (int step = 0; step < steps; ++step) {
    lora::fill_normal(X, rng, 0.0, 1.0);
    const Matrix proj = P * X;
    fc1.forward(X, Z, ws1);
    A = Z.cwiseMax(0.0f);  // relu
    fc2.forward(A, H, ws2);
    // Softmax cross-entropy: G = (softmax(H) - onehot) / batch.
    loss = 0;
    for (int j = 0; j < batch; ++j) {
      const int label = (proj(0, j) > 0 ? 1 : 0) + (proj(1, j) > 0 ? 2 : 0);
      const Eigen::VectorXf e = (H.col(j).array() - H.col(j).maxCoeff()).exp();
      G.col(j) = e / e.sum();
      loss -= std::log(G(label, j));
      G(label, j) -= 1;
    }
    G /= static_cast<float>(batch);
    loss /= static_cast<float>(batch);
    if (step == 0) first_loss = loss;
    opt.zero_grad();
    fc2.backward(A, G, dA, ws2);
    dA.array() *= (Z.array() > 0).cast<float>();  // relu'
    fc1.backward_without_input_grad(X, dA, ws1);  // the first layer: no dX needed
    lora::clip_grad_norm(params, 1.0f);
    schedule.apply(opt);
    opt.step();
  }
  std::printf("loss %.4f -> %.4f after %d steps\n", first_loss, loss, steps);

  // Save: one directory per adapter (one use_dora per PEFT file), the optimizer state beside.
  lora::peft::save_adapter(out + "/fc1_dora", {{"fc1", &fc1}});
  lora::peft::save_adapter(out + "/fc2_lora", {{"fc2", &fc2}});
  lora::save_optimizer_state(out + "/fc1_dora/optimizer.safetensors", opt);

  // Rebuild from the files onto the same kinds of base: W0 from the checkpoint, the adapter
  // (rank, scaling, DoRA's magnitude) from the file, the storage as a template argument.
  auto rebuilt1 = lora::peft::make_layers<float, lora::Nf4FrozenWeight>(
      out + "/fc1_dora", {{"fc1", W1}}, {{"fc1", b1}});
  auto rebuilt2 =
      lora::peft::make_layers<float, lora::Bf16FrozenWeight>(out + "/fc2_lora", {{"fc2", W2}});
  auto& r1 = rebuilt1.at("fc1");
  auto& r2 = rebuilt2.at("fc2");
  for (auto* l : {&fc1, &r1}) l->eval();
  for (auto* l : {&fc2, &r2}) l->eval();
  lora::fill_normal(X, rng, 0.0, 1.0);
  const Matrix trained = fc2.forward(fc1.forward(X).cwiseMax(0.0f));
  const Matrix again = r2.forward(r1.forward(X).cwiseMax(0.0f));
  const bool same = trained == again && r1.config().use_dora && !r2.config().use_dora;
  std::printf("rebuilt from %s: outputs %s\n", out.c_str(),
              same ? "bit-identical" : "DIFFER (a bug)");
  return same && loss < first_loss ? 0 : 1;
}
