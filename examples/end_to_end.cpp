// End to end: a 2-layer MLP whose linear layers are LoRA layers, trained with AdamW on synthetic
// data for two tasks that share one frozen base; each task's adapter saved in PEFT's format, loaded
// into fresh layers built from the file, merged for inference, and both served from one base by
// switching adapters. Prints every check; exits 1 when one fails.
//
//   model:  Y = fc2(relu(fc1(X))),  fc_i(X) = W_i X + b_i + s B_i A_i X   (W_i, b_i frozen)
//   task t: the same network with a hidden low-rank change of W_1 and W_2 (one per task)
//
// Usage: end_to_end [output folder]   (default: the folder named at build time, in the build tree)
#include <lora/core.hpp>
#include <lora/peft.hpp>

#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <string>

#ifndef LORA_END_TO_END_DIR
#define LORA_END_TO_END_DIR "end_to_end_out"
#endif

namespace {

using Matrix = Eigen::MatrixXf;
using Vector = Eigen::VectorXf;
using Layer = lora::LoRALinear<float>;

constexpr int kIn = 16, kHidden = 32, kOut = 4, kSamples = 256;

int failures = 0;

void check(bool ok, const char* what, double value) {
  std::printf("  [%s] %-66s %.3g\n", ok ? " ok " : "FAIL", what, value);
  if (!ok) ++failures;
}

/// The MLP's output for layers fc1, fc2 (any layer type with forward(X)).
template <typename L1, typename L2>
Matrix mlp(const L1& fc1, const L2& fc2, const Matrix& X) {
  return fc2.forward(fc1.forward(X).cwiseMax(0.0f));  // kOut x n
}

/// 0.5/n ||Y - T||^2
double loss_of(const Matrix& Y, const Matrix& T) {
  return 0.5 * (Y - T).squaredNorm() / static_cast<double>(Y.cols());
}

/// Trains fc1 and fc2's adapters on (X, T) with AdamW; returns the final loss.
double train(Layer& fc1, Layer& fc2, const Matrix& X, const Matrix& T, int steps) {
  auto params = fc1.parameters();
  for (auto& p : fc2.parameters()) params.push_back(p);
  lora::AdamWOptions opt;
  opt.lr = 1e-2;
  opt.weight_decay = 0.0;
  lora::AdamW<float> adamw(params, opt);
  const float n = static_cast<float>(X.cols());
  for (int step = 0; step < steps; ++step) {
    const Matrix Z = fc1.forward(X);    // kHidden x n
    const Matrix H = Z.cwiseMax(0.0f);  // relu
    const Matrix Y = fc2.forward(H);    // kOut x n
    fc1.zero_grad();
    fc2.zero_grad();
    const Matrix dH = fc2.backward(H, (Y - T) / n);  // dL/dH
    fc1.backward(X, dH.cwiseProduct((Z.array() > 0.0f).cast<float>().matrix()));
    adamw.step();
  }
  return loss_of(mlp(fc1, fc2, X), T);
}

/// Targets of a task: the base network with W1 + P1 Q1 and W2 + P2 Q2 (rank 2, seeded).
Matrix task_targets(const Matrix& W1, const Vector& b1, const Matrix& W2, const Vector& b2,
                    const Matrix& X, std::uint64_t seed) {
  lora::Rng rng(seed);
  Matrix P1(kHidden, 2), Q1(2, kIn), P2(kOut, 2), Q2(2, kHidden);
  lora::fill_normal(P1, rng, 0.0, 0.5);
  lora::fill_normal(Q1, rng, 0.0, 0.5);
  lora::fill_normal(P2, rng, 0.0, 0.5);
  lora::fill_normal(Q2, rng, 0.0, 0.5);
  const Matrix H = (((W1 + P1 * Q1) * X).colwise() + b1).cwiseMax(0.0f);
  return ((W2 + P2 * Q2) * H).colwise() + b2;
}

/// The largest |merged - unmerged| allowed: the rounding bound of the two float products,
/// gamma_m (|W||X| + s|B||A||X|) with m = inner length + rank + 2 and gamma_m = m u / (1 - m u).
/// Returned for one layer applied to X.
double merge_bound(const Layer& layer, const Matrix& X) {
  const double u = std::numeric_limits<float>::epsilon() / 2;
  const double m = static_cast<double>(layer.in_features() + layer.rank() + 2);
  const Eigen::MatrixXd aX = X.cast<double>().cwiseAbs();
  const Eigen::MatrixXd mag = layer.frozen().weight().cast<double>().cwiseAbs() * aX +
                              std::abs(double(layer.scaling())) *
                                  layer.B().cast<double>().cwiseAbs() *
                                  (layer.A().cast<double>().cwiseAbs() * aX);
  return m * u / (1 - m * u) * 2 * mag.maxCoeff();  // both the merged and unmerged rounding
}

}  // namespace

int main(int argc, char** argv) {
  const std::string out = argc > 1 ? argv[1] : LORA_END_TO_END_DIR;
  std::printf("End-to-end LoRA: MLP %d -> %d -> %d, files under %s\n", kIn, kHidden, kOut,
              out.c_str());

  // ---- the frozen base and the data ----
  lora::Rng rng(2024);
  Matrix W1(kHidden, kIn), W2(kOut, kHidden), X(kIn, kSamples);
  lora::fill_normal(W1, rng, 0.0, 1.0 / std::sqrt(double(kIn)));
  lora::fill_normal(W2, rng, 0.0, 1.0 / std::sqrt(double(kHidden)));
  lora::fill_normal(X, rng, 0.0, 1.0);
  const Vector b1 = Vector::Constant(kHidden, 0.1f), b2 = Vector::Zero(kOut);
  const Matrix T_a = task_targets(W1, b1, W2, b2, X, 1), T_b = task_targets(W1, b1, W2, b2, X, 2);

  // ---- task a: LoRA layers on the frozen base, AdamW ----
  lora::LoRAConfig cfg;
  cfg.rank = 4;
  cfg.alpha = 8;
  cfg.seed = 7;
  Layer fc1(W1, b1, cfg), fc2(W2, b2, cfg);
  std::printf("%s\n",
              lora::summary(std::map<std::string, const Layer*>{{"fc1", &fc1}, {"fc2", &fc2}})
                  .to_string()
                  .c_str());
  const double before_a = loss_of(mlp(fc1, fc2, X), T_a);
  const double after_a = train(fc1, fc2, X, T_a, 300);
  std::printf("task a: loss %.4f -> %.4f\n", before_a, after_a);
  check(after_a < 0.2 * before_a, "AdamW training cuts task a's loss by 5x (ratio)",
        after_a / before_a);

  // ---- save in PEFT's format (parent folders are created) ----
  const std::string dir_a = out + "/task_a";
  lora::peft::save_adapter(dir_a, {{"fc1", &fc1}, {"fc2", &fc2}});
  std::printf("saved %s/adapter_config.json and adapter_model.safetensors\n", dir_a.c_str());

  // ---- load into fresh layers built from the file (rank from the file) ----
  const lora::peft::BaseWeights<float> base{{"fc1", W1}, {"fc2", W2}};
  const lora::peft::BaseBiases<float> biases{{"fc1", b1}, {"fc2", b2}};
  auto loaded = lora::peft::make_layers(dir_a, base, biases);
  const Matrix X_test = Matrix::Random(kIn, 64);
  const Matrix Y_a = mlp(fc1, fc2, X_test);
  const Matrix Y_loaded = mlp(loaded.at("fc1"), loaded.at("fc2"), X_test);
  check(Y_loaded == Y_a, "loaded layers give the trained outputs bit for bit (max |diff|)",
        (Y_loaded - Y_a).cwiseAbs().maxCoeff());

  // ---- merge for inference: per layer, within the float rounding bound of the products ----
  for (const char* name : {"fc1", "fc2"}) {
    Layer& layer = loaded.at(name);
    const Matrix In = std::string(name) == "fc1" ? X_test : fc1.forward(X_test).cwiseMax(0.0f);
    const Matrix unmerged = layer.forward(In);
    const double bound = merge_bound(layer, In);
    layer.merge();
    const double gap = (layer.forward(In) - unmerged).cwiseAbs().maxCoeff();
    char what[96];
    std::snprintf(what, sizeof what, "merged %s within the rounding bound %.2e (max |diff|)", name,
                  bound);
    check(gap <= bound, what, gap);
  }

  // ---- a second task on the same base, then both adapters on one base ----
  Layer gc1(W1, b1, cfg), gc2(W2, b2, cfg);
  const double before_b = loss_of(mlp(gc1, gc2, X), T_b);
  const double after_b = train(gc1, gc2, X, T_b, 300);
  std::printf("task b: loss %.4f -> %.4f\n", before_b, after_b);
  check(after_b < 0.2 * before_b, "AdamW training cuts task b's loss by 5x (ratio)",
        after_b / before_b);
  const std::string dir_b = out + "/task_b";
  lora::peft::save_adapter(dir_b, {{"fc1", &gc1}, {"fc2", &gc2}});  // the module names of task a

  auto multi = lora::peft::make_multi_layers(dir_a, base, "task_a", biases);
  lora::peft::load_adapter(dir_b,
                           std::map<std::string, lora::MultiLoRALinear<float>*>{
                               {"fc1", &multi.at("fc1")}, {"fc2", &multi.at("fc2")}},
                           "task_b");
  const Matrix Y_b = mlp(gc1, gc2, X_test);
  for (auto& [name, layer] : multi) layer.set_active("task_b");
  const Matrix Y_multi_b = mlp(multi.at("fc1"), multi.at("fc2"), X_test);
  for (auto& [name, layer] : multi) layer.set_active("task_a");
  const Matrix Y_multi_a = mlp(multi.at("fc1"), multi.at("fc2"), X_test);
  check(Y_multi_a == Y_a, "one base, adapter task_a: task a's outputs bit for bit",
        (Y_multi_a - Y_a).cwiseAbs().maxCoeff());
  check(Y_multi_b == Y_b, "one base, adapter task_b: task b's outputs bit for bit",
        (Y_multi_b - Y_b).cwiseAbs().maxCoeff());
  check((Y_a - Y_b).cwiseAbs().maxCoeff() > 0.1, "the two tasks' outputs differ (max |diff|)",
        (Y_a - Y_b).cwiseAbs().maxCoeff());
  std::printf("%s\n", lora::summary(multi).to_string().c_str());

  std::printf(failures == 0 ? "all checks passed\n" : "%d check(s) FAILED\n", failures);
  return failures == 0 ? 0 : 1;
}
