// Runs a PEFT adapter from C++: loads the GPT-2 and LLaMA adapters that PEFT 0.21 saved
// (adapter_config.json + adapter_model.safetensors) onto their base layers, applies each module to
// the input PEFT used, and prints how closely the output agrees with PEFT's own. Then saves the
// adapter again and shows that the file is byte-identical to PEFT's.
//
//   peft_adapter [FIXTURE_DIR]     (default: the copy in tests/fixtures/peft)
#include <lora/lora.hpp>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <string>

#ifndef LORA_PEFT_FIXTURE_DIR
#define LORA_PEFT_FIXTURE_DIR "tests/fixtures/peft"
#endif

namespace {

using Layer = lora::LoRALinear<float>;

/// Builds one layer per module from `<name>_modules.safetensors`, loads the adapter, compares.
/// Returns the largest relative error.
double run(const std::string& fixtures, const std::string& name, bool conv1d) {
  const auto refs = lora::io::SafeTensors::load(fixtures + "/" + name + "_modules.safetensors");
  std::map<std::string, std::unique_ptr<Layer>> layers;
  std::map<std::string, Layer*> targets;  // module path -> layer: what load_adapter fills
  std::map<std::string, std::string> ref_key;
  for (const auto& key : refs.names()) {
    if (key.size() < 3 || key.compare(key.size() - 3, 3, "/W0") != 0) continue;
    const std::string base = key.substr(0, key.size() - 3);
    std::string path = base.substr(std::string("base_model/model/").size());
    for (char& c : path)
      if (c == '/') c = '.';
    Eigen::MatrixXf W0 = refs.matrix<float>(key);
    if (conv1d) W0.transposeInPlace();  // GPT-2's Conv1D stores in x out; the layer wants out x in
    Eigen::VectorXf bias;
    if (refs.contains(base + "/bias")) bias = refs.vector<float>(base + "/bias");
    layers[path] = std::make_unique<Layer>(std::move(W0), std::move(bias), lora::LoRAConfig{});
    targets[path] = layers[path].get();
    ref_key[path] = base;
  }

  const lora::peft::AdapterConfig cfg = lora::peft::load_adapter(fixtures + "/" + name, targets);
  std::printf("%s: r=%d alpha=%g rslora=%d fan_in_fan_out=%d lora_bias=%d, %zu modules\n",
              name.c_str(), cfg.r, cfg.lora_alpha, cfg.use_rslora, cfg.fan_in_fan_out,
              cfg.lora_bias, layers.size());
  double worst = 0;
  for (const auto& [path, layer] : layers) {
    const Eigen::MatrixXf x = refs.matrix<float>(ref_key[path] + "/x").transpose();  // k x n
    const Eigen::MatrixXf y = refs.matrix<float>(ref_key[path] + "/y").transpose();  // d x n
    const Eigen::MatrixXf h = layer->forward(x);
    const double err = (h - y).cwiseAbs().maxCoeff() / y.cwiseAbs().maxCoeff();
    worst = std::max(worst, err);
    std::printf("  %-36s r=%lld s=%-7.4f max rel. difference from PEFT %.2e\n", path.c_str(),
                static_cast<long long>(layer->rank()), static_cast<double>(layer->scaling()), err);
  }

  // Save it back: the weights file is PEFT's, byte for byte.
  lora::peft::SaveOptions options;
  options.base = cfg;
  const std::string out = "peft_adapter_resaved_" + name;
  lora::peft::save_adapter(out, targets, options);
  const auto read = [](const std::string& p) {
    return lora::io::SafeTensors::load(p).names().size();
  };
  std::ifstream a(out + "/adapter_model.safetensors", std::ios::binary),
      b(fixtures + "/" + name + "/adapter_model.safetensors", std::ios::binary);
  const std::string sa((std::istreambuf_iterator<char>(a)), std::istreambuf_iterator<char>()),
      sb((std::istreambuf_iterator<char>(b)), std::istreambuf_iterator<char>());
  std::printf("  saved to %s/: %zu tensors, %s PEFT's file\n", out.c_str(),
              read(out + "/adapter_model.safetensors"),
              sa == sb ? "byte-identical to" : "DIFFERENT from");
  if (sa != sb) worst = 1.0;
  return worst;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string fixtures = argc > 1 ? argv[1] : LORA_PEFT_FIXTURE_DIR;
  try {
    double worst = run(fixtures, "llama_adapter", false);
    worst = std::max(worst, run(fixtures, "llama_pattern_adapter", false));
    worst = std::max(worst, run(fixtures, "gpt2_adapter", true));
    std::printf("largest relative difference from PEFT: %.2e (%s)\n", worst,
                worst < 1e-5 ? "agrees" : "DISAGREES");
    return worst < 1e-5 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peft_adapter: %s\n", e.what());
    return 1;
  }
}
