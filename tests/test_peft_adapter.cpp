// PEFT adapter directories: loading PEFT's own files reproduces PEFT's per-module outputs
// (LLaMA, rank_pattern, GPT-2 Conv1D with rsLoRA, alpha_pattern and lora_bias); saving writes
// files equal to PEFT's; every inconsistency between file, config and layers is a clear error;
// a failed save leaves the previous files byte-identical.
#include "test_helpers.hpp"

#include <lora/io/atomic_file.hpp>
#include <lora/io/safetensors_writer.hpp>
#include <lora/lora_linear.hpp>
#include <lora/peft/adapter_config.hpp>
#include <lora/peft/adapter_io.hpp>

#include <nlohmann/json.hpp>

#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace test_peft_adapter {
namespace {

using lora::io::DType;
using lora::io::FormatError;
using lora::io::SafeTensors;
using lora::peft::AdapterConfig;
using Layer = lora::LoRALinear<float>;

/// A base model read from `<name>_modules.safetensors`: one layer per adapted module (W0 as
/// out x in; GPT-2's Conv1D weight, stored in x out, is transposed), with PEFT's x and y.
struct Model {
  std::map<std::string, std::unique_ptr<Layer>> layers;
  std::map<std::string, Eigen::MatrixXf> x, y;  // column per sample: k x 3, d x 3

  std::map<std::string, Layer*> targets() {
    std::map<std::string, Layer*> out;
    for (auto& [path, layer] : layers) out[path] = layer.get();
    return out;
  }
};

Model load_model(const std::string& name, bool conv1d) {
  const SafeTensors st =
      SafeTensors::load(lora::test::fixture_path("peft/" + name + "_modules.safetensors"));
  Model m;
  const std::string prefix = "base_model/model/";
  for (const auto& key : st.names()) {
    if (key.size() < 3 || key.compare(key.size() - 3, 3, "/W0") != 0) continue;
    const std::string base = key.substr(0, key.size() - 3);
    std::string path = base.substr(prefix.size());
    std::replace(path.begin(), path.end(), '/', '.');
    Eigen::MatrixXf W0 = st.matrix<float>(key);
    if (conv1d) W0.transposeInPlace();
    Eigen::VectorXf bias;
    if (st.contains(base + "/bias")) bias = st.vector<float>(base + "/bias");
    lora::LoRAConfig cfg;
    cfg.rank = 1;
    m.layers[path] = std::make_unique<Layer>(std::move(W0), std::move(bias), cfg);
    m.x[path] = st.matrix<float>(base + "/x").transpose();
    m.y[path] = st.matrix<float>(base + "/y").transpose();
  }
  return m;
}

std::string adapter_dir(const std::string& name) {
  return lora::test::fixture_path("peft/" + name);
}

std::string tmp_dir(const std::string& name) {
  const std::string dir = std::string(LORA_TEST_TMP_DIR) + "/" + name;
  ::mkdir(dir.c_str(), 0777);
  return dir;
}

void copy_file(const std::string& from, const std::string& to) {
  const auto bytes = lora::test::read_bytes(from);
  lora::io::write_file_atomically(to, bytes.data(), bytes.size());
}

/// A scratch copy of a fixture adapter directory that a test may damage.
std::string copy_adapter(const std::string& name, const std::string& as) {
  const std::string dir = tmp_dir(as);
  copy_file(adapter_dir(name) + "/adapter_config.json", dir + "/adapter_config.json");
  copy_file(adapter_dir(name) + "/adapter_model.safetensors", dir + "/adapter_model.safetensors");
  return dir;
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

void write_json(const std::string& path, const nlohmann::json& j) {
  lora::io::write_file_atomically(path, j.dump(2));
}

template <typename F>
void expect_error(F f, const std::string& part) {
  try {
    f();
    ADD_FAILURE() << "expected an error mentioning \"" << part << "\"";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

void expect_reproduces_peft(Model& m, double tol = 1e-5) {
  for (auto& [path, layer] : m.layers) {
    const Eigen::MatrixXf H = layer->forward(m.x[path]);
    EXPECT_MATRIX_NEAR(H, m.y[path], tol) << path;
    layer->merge();  // the merged layer gives the same output
    EXPECT_MATRIX_NEAR(layer->forward(m.x[path]), m.y[path], tol) << path << " merged";
    layer->unmerge();
  }
}

// ---- loading PEFT's files
// ------------------------------------------------------------------------

TEST(PeftAdapter, LlamaAdapterReproducesPeftOutputs) {
  Model m = load_model("llama_adapter", false);
  ASSERT_EQ(m.layers.size(), 8u);
  const AdapterConfig cfg = lora::peft::load_adapter(adapter_dir("llama_adapter"), m.targets());
  EXPECT_EQ(cfg.r, 4);
  EXPECT_EQ(cfg.lora_alpha, 8.0);
  for (auto& [path, layer] : m.layers) {
    EXPECT_EQ(layer->rank(), 4) << path;
    EXPECT_FLOAT_EQ(layer->scaling(), 2.0f) << path;
  }
  expect_reproduces_peft(m);
}

TEST(PeftAdapter, RankPatternGivesEachModuleItsRank) {
  Model m = load_model("llama_pattern_adapter", false);
  lora::peft::load_adapter(adapter_dir("llama_pattern_adapter"), m.targets());
  EXPECT_EQ(m.layers.at("model.layers.0.mlp.down_proj")->rank(), 4);
  EXPECT_EQ(m.layers.at("model.layers.1.self_attn.v_proj")->rank(), 2);
  EXPECT_EQ(m.layers.at("model.layers.0.self_attn.v_proj")->rank(), 8);
  EXPECT_FLOAT_EQ(m.layers.at("model.layers.1.self_attn.v_proj")->scaling(), 8.0f);  // 16 / 2
  EXPECT_FLOAT_EQ(m.layers.at("model.layers.0.mlp.down_proj")->scaling(), 4.0f);     // 16 / 4
  expect_reproduces_peft(m);
}

TEST(PeftAdapter, Gpt2Conv1DWithRsloraAlphaPatternAndLoraBias) {
  Model m = load_model("gpt2_adapter", true);
  ASSERT_EQ(m.layers.size(), 6u);
  const AdapterConfig cfg = lora::peft::load_adapter(adapter_dir("gpt2_adapter"), m.targets());
  EXPECT_TRUE(cfg.fan_in_fan_out);
  EXPECT_TRUE(cfg.lora_bias);
  const Layer& c_proj = *m.layers.at("transformer.h.0.mlp.c_proj");
  EXPECT_EQ(c_proj.rank(), 2);
  EXPECT_FLOAT_EQ(c_proj.scaling(), static_cast<float>(3.0 / std::sqrt(2.0)));
  EXPECT_TRUE(c_proj.adapter().has_lora_bias());
  const Layer& c_attn = *m.layers.at("transformer.h.1.attn.c_attn");
  EXPECT_EQ(c_attn.rank(), 4);
  EXPECT_FLOAT_EQ(c_attn.scaling(), 4.0f);  // 8 / sqrt(4)
  expect_reproduces_peft(m);
}

TEST(PeftAdapter, ReadsHalfPrecisionFilesToo) {
  // The fixture's tensors converted to BF16: loading works and matches the rounded factors.
  const auto f32 = lora::peft::read_adapter<float>(adapter_dir("llama_adapter"));
  std::map<std::string, const lora::LoRAAdapter<float>*> adapters;
  for (const auto& [p, a] : f32.modules) adapters[p] = &a;
  lora::peft::SaveOptions opt;
  opt.dtype = DType::BF16;
  opt.base = f32.config;
  const std::string dir = tmp_dir("bf16_adapter");
  lora::peft::write_adapter<float>(dir, adapters, opt);
  const auto bf = lora::peft::read_adapter<float>(dir);
  for (const auto& [p, a] : f32.modules) {
    const auto& b = bf.modules.at(p);
    for (Eigen::Index i = 0; i < a.A().size(); ++i)
      ASSERT_EQ(b.A()(i), lora::io::bf16_to_float(lora::io::float_to_bf16(a.A()(i))));
  }
}

// ---- saving
// ---------------------------------------------------------------------------------------

TEST(PeftAdapter, SavingALoadedAdapterWritesPeftsFilesAgain) {
  for (const std::string name : {"llama_adapter", "llama_pattern_adapter", "gpt2_adapter"}) {
    Model m = load_model(name, name == "gpt2_adapter");
    const AdapterConfig cfg = lora::peft::load_adapter(adapter_dir(name), m.targets());
    lora::peft::SaveOptions opt;
    opt.base = cfg;
    const std::string out = tmp_dir("resaved_" + name);
    lora::peft::save_adapter(out, m.targets(), opt);
    // The weights file is byte-identical to PEFT's; the config is the same JSON.
    EXPECT_TRUE(lora::test::read_bytes(out + "/adapter_model.safetensors") ==
                lora::test::read_bytes(adapter_dir(name) + "/adapter_model.safetensors"))
        << name;
    EXPECT_EQ(read_json(out + "/adapter_config.json"),
              read_json(adapter_dir(name) + "/adapter_config.json"))
        << name;
  }
}

TEST(PeftAdapter, FreshSaveHasPeftsKeysDtypesShapesAndConfigFields) {
  // Layers built in code (no base config): same tensor keys, dtypes, shapes and config fields as
  // PEFT's llama_adapter, and loading it back gives the same layers.
  Model m = load_model("llama_adapter", false);
  lora::peft::load_adapter(adapter_dir("llama_adapter"), m.targets());
  const std::string out = tmp_dir("fresh_llama");
  lora::peft::save_adapter(out, m.targets());
  const SafeTensors mine = SafeTensors::load(out + "/adapter_model.safetensors");
  const SafeTensors peft =
      SafeTensors::load(adapter_dir("llama_adapter") + "/adapter_model.safetensors");
  ASSERT_EQ(mine.names(), peft.names());
  for (const auto& n : peft.names()) {
    EXPECT_EQ(mine.info(n).dtype, peft.info(n).dtype) << n;
    EXPECT_EQ(mine.info(n).shape, peft.info(n).shape) << n;
    EXPECT_EQ(mine.info(n).begin, peft.info(n).begin) << n;
  }
  EXPECT_EQ(mine.metadata(), peft.metadata());
  const nlohmann::json a = read_json(out + "/adapter_config.json");
  const nlohmann::json b = read_json(adapter_dir("llama_adapter") + "/adapter_config.json");
  std::vector<std::string> ka, kb;
  for (const auto& [k, v] : a.items()) ka.push_back(k);
  for (const auto& [k, v] : b.items()) kb.push_back(k);
  EXPECT_EQ(ka, kb);
  for (const char* k : {"r", "lora_alpha", "use_rslora", "peft_type", "bias", "lora_bias",
                        "use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern"})
    EXPECT_EQ(a[k], b[k]) << k;
  EXPECT_EQ(a["target_modules"].size(), 8u);  // the full module paths

  Model back = load_model("llama_adapter", false);
  lora::peft::load_adapter(out, back.targets());
  for (auto& [path, layer] : back.layers) {
    EXPECT_TRUE(layer->adapter().A() == m.layers.at(path)->adapter().A()) << path;
    EXPECT_TRUE(layer->adapter().B() == m.layers.at(path)->adapter().B()) << path;
  }
  expect_reproduces_peft(back);
}

TEST(PeftAdapter, FreshSaveOfMixedRanksWritesPatternsThatRebuildThem) {
  // Ranks 2, 4, 4 and alphas 3, 8, 8 in double: PEFT's rules must give each module back.
  lora::LoRAConfig c4, c2;
  c4.rank = 4;
  c4.alpha = 8;
  c2.rank = 2;
  c2.alpha = 3;
  c2.seed = 3;
  lora::LoRALinear<double> q(Eigen::MatrixXd::Random(6, 5), c4),
      v(Eigen::MatrixXd::Random(6, 5), c4), o(Eigen::MatrixXd::Random(5, 6), c2);
  q.B().setRandom();
  v.B().setRandom();
  o.B().setRandom();
  std::map<std::string, lora::LoRALinear<double>*> layers{
      {"m.layers.0.q", &q}, {"m.layers.0.v", &v}, {"m.layers.1.o", &o}};
  const std::string out = tmp_dir("mixed_ranks");
  const AdapterConfig written = lora::peft::save_adapter(out, layers);
  EXPECT_EQ(written.r, 4);
  EXPECT_EQ(written.rank_pattern.size(), 1u);
  const auto file = lora::peft::read_adapter<double>(out);
  EXPECT_EQ(file.modules.at("m.layers.1.o").rank(), 2);
  EXPECT_EQ(file.modules.at("m.layers.1.o").scaling(), 1.5);
  EXPECT_EQ(file.modules.at("m.layers.0.q").scaling(), 2.0);
  // F64 round trip is bit-exact.
  EXPECT_TRUE(file.modules.at("m.layers.1.o").A() == o.A());
  EXPECT_TRUE(file.modules.at("m.layers.1.o").B() == o.B());
  EXPECT_EQ(SafeTensors::load(out + "/adapter_model.safetensors")
                .info("base_model.model.m.layers.0.q.lora_A.weight")
                .dtype,
            DType::F64);
}

TEST(PeftAdapter, FailedSaveLeavesThePreviousAdapterByteIdentical) {
  Model m = load_model("llama_adapter", false);
  lora::peft::load_adapter(adapter_dir("llama_adapter"), m.targets());
  const std::string out = copy_adapter("llama_adapter", "failed_save");
  const auto weights_before = lora::test::read_bytes(out + "/adapter_model.safetensors");
  const auto config_before = lora::test::read_bytes(out + "/adapter_config.json");
  for (auto& [path, layer] : m.layers) layer->B().array() += 1.0f;  // a different adapter
  using lora::io::detail::WriteStep;
  for (const WriteStep step :
       {WriteStep::Open, WriteStep::Write, WriteStep::Sync, WriteStep::Rename}) {
    lora::io::detail::injected_write_failure = step;
    EXPECT_THROW(lora::peft::save_adapter(out, m.targets()), lora::io::WriteError);
    lora::io::detail::injected_write_failure = WriteStep::None;
    EXPECT_EQ(lora::test::read_bytes(out + "/adapter_model.safetensors"), weights_before);
    EXPECT_EQ(lora::test::read_bytes(out + "/adapter_config.json"), config_before);
  }
  // The weights file is replaced, then writing the config fails: the old weights come back.
  lora::io::detail::injected_write_failure = WriteStep::Rename;
  lora::io::detail::injected_write_failure_skip = 1;
  EXPECT_THROW(lora::peft::save_adapter(out, m.targets()), lora::io::WriteError);
  lora::io::detail::injected_write_failure = WriteStep::None;
  lora::io::detail::injected_write_failure_skip = 0;
  EXPECT_EQ(lora::test::read_bytes(out + "/adapter_model.safetensors"), weights_before);
  EXPECT_EQ(lora::test::read_bytes(out + "/adapter_config.json"), config_before);
  lora::peft::save_adapter(out, m.targets());  // and a save that works replaces both
  EXPECT_NE(lora::test::read_bytes(out + "/adapter_model.safetensors"), weights_before);
}

// ---- errors
// --------------------------------------------------------------------------------------

TEST(PeftAdapter, MissingModuleExtraModuleAndShapeMismatchAreErrors) {
  {
    Model m = load_model("llama_adapter", false);
    auto targets = m.targets();
    targets.erase("model.layers.1.self_attn.o_proj");
    expect_error([&] { lora::peft::load_adapter(adapter_dir("llama_adapter"), targets); },
                 "model.layers.1.self_attn.o_proj\" but no layer");
  }
  {
    Model m = load_model("llama_adapter", false);
    auto targets = m.targets();
    Layer extra(Eigen::MatrixXf::Random(32, 32), lora::LoRAConfig{});
    targets["model.layers.0.mlp.up_proj"] = &extra;
    expect_error([&] { lora::peft::load_adapter(adapter_dir("llama_adapter"), targets); },
                 "no weights for module \"model.layers.0.mlp.up_proj\"");
  }
  {
    Model m = load_model("llama_adapter", false);
    auto targets = m.targets();
    Layer wrong(Eigen::MatrixXf::Random(32, 32), lora::LoRAConfig{});  // k_proj is 16 x 32
    targets["model.layers.0.self_attn.k_proj"] = &wrong;
    const Eigen::MatrixXf A_before = m.layers.at("model.layers.0.self_attn.q_proj")->A();
    expect_error([&] { lora::peft::load_adapter(adapter_dir("llama_adapter"), targets); },
                 "16 x 32 (out x in) weight, but its layer's W0 is 32 x 32");
    // Nothing was loaded into the other layers.
    EXPECT_TRUE(m.layers.at("model.layers.0.self_attn.q_proj")->A() == A_before);
  }
  {
    Model m = load_model("llama_adapter", false);
    m.layers.begin()->second->merge();
    expect_error([&] { lora::peft::load_adapter(adapter_dir("llama_adapter"), m.targets()); },
                 "is merged");
  }
}

TEST(PeftAdapter, ConfigProblemsAreClearErrors) {
  struct Case {
    const char* what;
    std::function<void(nlohmann::json&)> edit;
    const char* message;
  };
  const std::vector<Case> cases = {
      {"dora", [](nlohmann::json& j) { j["use_dora"] = true; }, "DoRA"},
      {"modules_to_save", [](nlohmann::json& j) { j["modules_to_save"] = {"lm_head"}; },
       "modules_to_save"},
      {"bias", [](nlohmann::json& j) { j["bias"] = "all"; }, "bias is \"all\""},
      {"peft_type", [](nlohmann::json& j) { j["peft_type"] = "IA3"; }, "only LoRA"},
      {"unused pattern", [](nlohmann::json& j) { j["rank_pattern"]["gate_proj"] = 2; },
       "rank_pattern key \"gate_proj\" matches none"},
      {"unused alpha", [](nlohmann::json& j) { j["alpha_pattern"]["layers\\.7\\..*"] = 2; },
       "alpha_pattern key"},
      {"rank mismatch", [](nlohmann::json& j) { j["rank_pattern"]["q_proj"] = 2; },
       "rank_pattern key \"q_proj\""},
      {"r wrong", [](nlohmann::json& j) { j["r"] = 8; }, "gives rank 8 (r)"},
      {"r type", [](nlohmann::json& j) { j["r"] = "4"; }, "r must be a positive integer"},
      {"lora_bias", [](nlohmann::json& j) { j["lora_bias"] = true; }, "lora_B.bias\" is missing"},
      {"targets",
       [](nlohmann::json& j) {
         j["target_modules"] = {"q_proj", "v_proj"};
       },
       "not selected by target_modules"},
      {"bad regex", [](nlohmann::json& j) { j["rank_pattern"]["q_proj("] = 2; },
       "not a valid regular expression"},
      {"missing peft_type", [](nlohmann::json& j) { j.erase("peft_type"); }, "peft_type"},
  };
  for (const auto& c : cases) {
    const std::string dir = copy_adapter("llama_adapter", "bad_config");
    nlohmann::json j = read_json(dir + "/adapter_config.json");
    c.edit(j);
    write_json(dir + "/adapter_config.json", j);
    Model m = load_model("llama_adapter", false);
    SCOPED_TRACE(c.what);
    expect_error([&] { lora::peft::load_adapter(dir, m.targets()); }, c.message);
  }
  const std::string dir = copy_adapter("llama_adapter", "bad_json");
  lora::io::write_file_atomically(dir + "/adapter_config.json", std::string("{\"r\": 4,"));
  expect_error([&] { lora::peft::read_adapter<float>(dir); }, "not valid JSON");
}

TEST(PeftAdapter, WeightFileProblemsAreClearErrors) {
  const auto original =
      SafeTensors::load(adapter_dir("llama_adapter") + "/adapter_model.safetensors");
  auto rewrite = [&](const std::string& dir, const std::string& drop, const std::string& add,
                     const Eigen::MatrixXf& extra) {
    lora::io::SafeTensorsWriter w;
    w.set_metadata("format", "pt");
    for (const auto& n : original.names())
      if (n != drop) w.add(n, original.matrix<float>(n), DType::F32);
    if (!add.empty()) w.add(add, extra, DType::F32);
    w.save(dir + "/adapter_model.safetensors");
  };
  const std::string q = "base_model.model.model.layers.0.self_attn.q_proj";
  {
    const std::string dir = copy_adapter("llama_adapter", "bad_weights");
    rewrite(dir, q + ".lora_B.weight", "", {});
    expect_error([&] { lora::peft::read_adapter<float>(dir); }, "lora_B.weight\" is missing");
  }
  {
    const std::string dir = copy_adapter("llama_adapter", "bad_weights");
    // DoRA's magnitude in an adapter whose config says use_dora: false.
    rewrite(dir, "", q + ".lora_magnitude_vector", Eigen::MatrixXf::Ones(1, 32));
    expect_error([&] { lora::peft::read_adapter<float>(dir); }, "use_dora (DoRA) is false");
  }
  {
    const std::string dir = copy_adapter("llama_adapter", "bad_weights");
    rewrite(dir, q + ".lora_B.weight", q + ".lora_B.weight", Eigen::MatrixXf::Ones(32, 3));
    expect_error([&] { lora::peft::read_adapter<float>(dir); }, "their ranks differ");
  }
  {
    const std::string dir = copy_adapter("llama_adapter", "bad_weights");
    auto bytes = lora::test::read_bytes(dir + "/adapter_model.safetensors");
    bytes.resize(bytes.size() - 100);  // truncated
    lora::io::write_file_atomically(dir + "/adapter_model.safetensors", bytes.data(), bytes.size());
    expect_error([&] { lora::peft::read_adapter<float>(dir); }, "run past the data section");
  }
  {
    const std::string dir = copy_adapter("llama_adapter", "bad_weights");
    ::unlink((dir + "/adapter_model.safetensors").c_str());
    expect_error([&] { lora::peft::read_adapter<float>(dir); }, "cannot open");
  }
}

TEST(PeftAdapter, ParsesFromMemoryAndBoundsModulePaths) {
  const std::string dir = adapter_dir("llama_adapter");
  std::ifstream in(dir + "/adapter_config.json");
  const std::string config((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto bytes = lora::test::read_bytes(dir + "/adapter_model.safetensors");
  const auto file = lora::peft::parse_adapter<double>(config, bytes, "mem");
  EXPECT_EQ(file.modules.size(), 8u);
  EXPECT_EQ(file.modules.at("model.layers.1.self_attn.o_proj").rank(), 4);
  expect_error([&] { lora::peft::parse_adapter<float>("{", bytes); }, "not valid JSON");
  expect_error([&] { lora::peft::parse_adapter<float>("[]", bytes); }, "must be a JSON object");

  lora::io::SafeTensorsWriter w;
  const std::string long_path(2000, 'm');
  w.add(lora::peft::key_of(long_path, "lora_A.weight"), Eigen::MatrixXf::Ones(1, 2), DType::F32);
  w.add(lora::peft::key_of(long_path, "lora_B.weight"), Eigen::MatrixXf::Ones(2, 1), DType::F32);
  expect_error(
      [&] { lora::peft::parse_adapter<float>(R"({"peft_type": "LORA", "r": 1})", w.serialize()); },
      "exceeds the limit");
}

TEST(PeftAdapter, CorruptWeightFilesAreClearErrors) {
  const std::string dir = adapter_dir("llama_adapter");
  std::ifstream in(dir + "/adapter_config.json");
  const std::string config((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto good = lora::test::read_bytes(dir + "/adapter_model.safetensors");
  // Same-length edits of the header, so only the named field changes.
  auto edited = [&](const std::string& from, const std::string& to) {
    std::string text(good.begin(), good.end());
    const auto at = text.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    text.replace(at, from.size(), to);
    return std::vector<std::uint8_t>(text.begin(), text.end());
  };
  auto header_length = [&](std::uint64_t n) {
    auto b = good;
    for (int i = 0; i < 8; ++i)
      b[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(n >> (8 * i));
    return b;
  };
  const std::vector<std::pair<std::vector<std::uint8_t>, std::string>> cases = {
      {header_length(good.size()), "runs past the end of the file"},
      {header_length(1u << 31), "exceeds the 100 MB limit"},
      {edited("{\"__metadata__\"", "[\"__metadata__\""), "not valid JSON"},
      {edited("\"dtype\":\"F32\"", "\"dtype\":\"I32\""), "has dtype I32"},
      {edited("[0,512]", "[4,516]"), "overlap"},
      {edited("[6912,7168]", "[6912,9168]"), "data_offsets"},
      {edited("\"shape\":[4,32]", "\"shape\":[2,64]"), "their ranks differ"},
      {std::vector<std::uint8_t>(good.begin(), good.begin() + 5), "shorter than the 8-byte"},
  };
  for (const auto& c : cases) {
    const auto& bytes = c.first;  // a named reference: lambdas cannot capture bindings in C++17
    SCOPED_TRACE(c.second);
    expect_error([&] { lora::peft::parse_adapter<float>(config, bytes, "corrupt"); }, c.second);
  }
}

TEST(PeftAdapter, AllLinearTargetsAreAccepted) {
  const std::string dir = copy_adapter("llama_adapter", "all_linear");
  nlohmann::json j = read_json(dir + "/adapter_config.json");
  j["target_modules"] = "all-linear";
  write_json(dir + "/adapter_config.json", j);
  EXPECT_EQ(lora::peft::read_adapter<float>(dir).modules.size(), 8u);
}

// ---- lora bias ---------------------------------------------------------------------------------

TEST(LoraBias, ForwardMergeAndGradientsMatchAnIndependentComputation) {
  lora::LoRAConfig cfg;
  cfg.rank = 3;
  cfg.alpha = 5;
  const Eigen::MatrixXd W0 = Eigen::MatrixXd::Random(7, 6);
  const Eigen::VectorXd b = Eigen::VectorXd::Random(7);
  lora::LoRALinear<double> layer(W0, b, cfg);
  layer.B().setRandom();
  lora::LoRAAdapter<double> a = layer.adapter();
  a.set_lora_bias(Eigen::VectorXd::Random(7));
  layer.replace_adapter(a);
  const Eigen::MatrixXd X = Eigen::MatrixXd::Random(6, 4);
  const Eigen::MatrixXd G = Eigen::MatrixXd::Random(7, 4);
  const double s = 5.0 / 3.0;
  const Eigen::MatrixXd expected =
      (W0 * X + s * a.B() * a.A() * X).colwise() + (b + s * a.lora_bias());
  EXPECT_MATRIX_NEAR(layer.forward(X), expected, 1e-13);
  layer.merge();
  EXPECT_MATRIX_NEAR(layer.forward(X), expected, 1e-13);
  layer.unmerge();

  layer.zero_grad();
  layer.backward(X, G);
  Eigen::MatrixXd bias = a.lora_bias();
  auto loss = [&] {
    const Eigen::MatrixXd H = (W0 * X + s * a.B() * a.A() * X).colwise() + (b + s * bias.col(0));
    return (H.array() * G.array()).sum();
  };
  const Eigen::MatrixXd numeric = lora::test::numeric_gradient(bias, loss);
  EXPECT_MATRIX_NEAR(layer.adapter().grad_lora_bias(), numeric, 1e-7);
  EXPECT_EQ(layer.trainable_parameter_count(), 3 * (7 + 6) + 7);
}

}  // namespace
}  // namespace test_peft_adapter
