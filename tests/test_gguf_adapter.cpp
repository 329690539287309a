// LoRA adapters in llama.cpp's GGUF format, judged by llama.cpp: an adapter trained by lora and
// saved as GGUF, loaded by llama.cpp at scale 1, gives llama.cpp's next-token log-probabilities
// on the base whose weights were merged (W0 + s B A, computed here densely and written as a GGUF
// base) to 1e-4, and differs from the bare base by 1e-2 or more. Also: two adapters at 0.5 + 0.5;
// f16, bf16 and q8_0 adapters (within their rounding); rsLoRA with per-module ranks and alphas
// (folded into B); a token_embd adapter (LoRAEmbedding's, A stored transposed) beside linear ones;
// files from outside (ggml's writer); files llama.cpp refuses are refused by lora first.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "gguf.h"
#include "gguf_test_files.hpp"
#include "llama_cpp_client.hpp"
#include "lora/gguf.hpp"
#include "lora/lora_embedding.hpp"
#include "lora/optim.hpp"
#include "tiny_llama.hpp"

namespace test_gguf_adapter {

using lora::io::GgmlType;
using lora::io::GgufFile;
using Layers = std::map<std::string, lora::LoRALinear<float>>;

const tiny_llama::Model& model() {
  static const tiny_llama::Model m = tiny_llama::make();
  return m;
}

// The bare base, written once, and llama.cpp's view of it.
const std::string& base_path() {
  static const std::string path = [] {
    const std::string p = gguf_test::tmp_path("adapter_base.gguf");
    tiny_llama::writer(model()).save(p);
    return p;
  }();
  return path;
}
const GgufFile& base_file() {
  static const GgufFile f = GgufFile::load(base_path());
  return f;
}
llama_cpp::Model& llama_base() {
  static llama_cpp::Model m(base_path());
  return m;
}
const Eigen::MatrixXd& bare_log_probs() {
  static const Eigen::MatrixXd lp = llama_base().log_probs(tiny_llama::prompt());
  return lp;
}

// Layers on the base's weights (read back from the GGUF base), trained a few AdamW steps on a
// regression toward random targets, so that every B is far from zero.
Layers train(const std::map<std::string, lora::LoRAConfig>& configs, unsigned seed) {
  Layers layers;
  std::mt19937 rng(seed);
  for (const auto& [name, cfg] : configs) {
    auto& layer = layers
                      .emplace(name, lora::LoRALinear<float>(
                                         lora::gguf::read_matrix<float>(base_file(), name), cfg))
                      .first->second;
    gguf_test::train_toward_random_targets(layer, rng, 0.05);
  }
  return layers;
}

// W0 + sum of weight * s * B * A, densely in double, for the adapters given (module -> adapter);
// the token embedding's table (n_vocab x n_embd) gains the transpose, s (B A)^T.
using Delta =
    std::vector<std::pair<double, const std::map<std::string, lora::LoRAAdapter<float>>*>>;
std::map<std::string, Eigen::MatrixXf> merged(const Delta& deltas) {
  std::map<std::string, Eigen::MatrixXf> out;
  for (const auto& [weight, adapters] : deltas)
    for (const auto& [name, a] : *adapters) {
      Eigen::MatrixXd W =
          out.count(name) ? out[name].cast<double>() : model().weights.at(name).cast<double>();
      const Eigen::MatrixXd BA = a.B().cast<double>() * a.A().cast<double>();
      if (name == "token_embd.weight")
        W += weight * static_cast<double>(a.scaling()) * BA.transpose();
      else
        W += weight * static_cast<double>(a.scaling()) * BA;
      out[name] = W.cast<float>();
    }
  return out;
}

Eigen::MatrixXd merged_log_probs(const Delta& deltas, const std::string& tag) {
  const std::string path = gguf_test::tmp_path("merged_" + tag + ".gguf");
  tiny_llama::writer(model(), GgmlType::F32, merged(deltas)).save(path);
  return llama_cpp::Model(path).log_probs(tiny_llama::prompt());
}

double max_diff(const Eigen::MatrixXd& a, const Eigen::MatrixXd& b) {
  return (a - b).cwiseAbs().maxCoeff();
}

std::map<std::string, lora::LoRAConfig> standard_configs(int rank = 4) {
  lora::LoRAConfig cfg;
  cfg.rank = rank;
  cfg.alpha = 2.0 * rank;
  std::map<std::string, lora::LoRAConfig> c;
  for (const char* n : {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
                        "blk.1.attn_output.weight", "blk.0.ffn_gate.weight", "blk.1.ffn_up.weight",
                        "blk.1.ffn_down.weight", "output.weight"})
    c[n] = cfg;
  return c;
}

// The adapters of layers, as the file holds them (read back by lora: f16/bf16/q8_0 rounding).
std::map<std::string, lora::LoRAAdapter<float>> as_saved(const std::string& path) {
  return lora::gguf::read_adapter<float>(path).modules;
}

void save(const std::string& path, const Layers& layers, GgmlType type = GgmlType::F32) {
  std::map<std::string, const lora::LoRAAdapter<float>*> adapters;
  for (const auto& [name, l] : layers) adapters.emplace(name, &l.adapter());
  lora::gguf::SaveOptions o;
  o.base = &base_file();
  o.type = type;
  lora::gguf::write_adapter<float>(path, adapters, o);
}

TEST(GgufAdapter, TrainedAdapterIsTheMergedBaseInLlamaCpp) {
  const Layers layers = train(standard_configs(), 1);
  const std::string path = gguf_test::tmp_path("adapter_f32.gguf");
  save(path, layers);
  const auto saved = as_saved(path);
  for (const auto& [name, l] : layers) {  // f32: the file holds the adapter exactly
    EXPECT_EQ(saved.at(name).A(), l.A()) << name;
    EXPECT_EQ(saved.at(name).B(), l.B()) << name;
    EXPECT_FLOAT_EQ(saved.at(name).scaling(), l.scaling()) << name;
  }
  llama_cpp::Adapter adapter(llama_base(), path);
  const Eigen::MatrixXd with = llama_base().log_probs(tiny_llama::prompt(), {{&adapter, 1.0f}});
  const Eigen::MatrixXd merged = merged_log_probs({{1.0, &saved}}, "f32");
  const double to_merged = max_diff(with, merged), to_bare = max_diff(with, bare_log_probs());
  RecordProperty("max_abs_logprob_diff_to_merged", std::to_string(to_merged));
  EXPECT_LE(to_merged, 1e-4);
  EXPECT_GE(to_bare, 1e-2);
}

// llama.cpp gathers rows of token_embd's lora_a (A^T, ne = [r, n_vocab]) and multiplies by lora_b:
// the file is right when llama.cpp with it equals llama.cpp on the table merged here densely.
TEST(GgufAdapter, TokenEmbeddingAdapterIsTheMergedTableInLlamaCpp) {
  const Eigen::MatrixXf& table = model().weights.at("token_embd.weight");  // n_vocab x n_embd
  lora::LoRAConfig cfg;
  cfg.rank = 4;
  cfg.alpha = 6;
  lora::LoRAEmbedding<float> embedding(table, cfg);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  // PEFT starts A at zero; an adapter that changes every token's row needs A random everywhere.
  Eigen::MatrixXf A(4, table.rows()), B(table.cols(), 4);
  for (Eigen::Index i = 0; i < A.size(); ++i) A.data()[i] = 0.5f * normal(rng);
  for (Eigen::Index i = 0; i < B.size(); ++i) B.data()[i] = 0.5f * normal(rng);
  const std::string name = embedding.active_name();  // "default"
  lora::LoRAAdapter<float> trained = embedding.adapter(name);
  trained.set_weights(A, B);
  embedding.replace_adapter(name, trained);
  // One file with the embedding's adapter and a linear layer's.
  const Layers layers = train(standard_configs(), 3);
  std::map<std::string, const lora::LoRAAdapter<float>*> adapters{
      {"token_embd.weight", &embedding.adapter(name)},
      {"blk.0.attn_q.weight", &layers.at("blk.0.attn_q.weight").adapter()}};
  lora::gguf::SaveOptions o;
  o.base = &base_file();
  const std::string path = gguf_test::tmp_path("adapter_token_embd.gguf");
  lora::gguf::write_adapter<float>(path, adapters, o);

  const GgufFile file = GgufFile::load(path);  // llama.cpp's layout, read by the container alone
  EXPECT_EQ(file.info("token_embd.weight.lora_a").ne, (std::vector<std::int64_t>{4, table.rows()}));
  EXPECT_EQ(file.info("token_embd.weight.lora_b").ne, (std::vector<std::int64_t>{4, table.cols()}));
  EXPECT_EQ(file.matrix<float>("token_embd.weight.lora_a"), A.transpose());
  lora::gguf::ReadOptions ro;
  ro.base = &base_file();
  const auto saved = lora::gguf::read_adapter<float>(path, ro).modules;
  EXPECT_EQ(saved.at("token_embd.weight").A(), A);  // read back as LoRAEmbedding's A and B
  EXPECT_EQ(saved.at("token_embd.weight").B(), B);
  lora::LoRAEmbedding<float> reloaded(table, cfg);
  reloaded.replace_adapter(name, saved.at("token_embd.weight"));
  const std::vector<std::int64_t> ids{0, 7, 3, 7};
  EXPECT_EQ(reloaded.forward(ids), embedding.forward(ids));

  llama_cpp::Adapter adapter(llama_base(), path);
  const Eigen::MatrixXd with = llama_base().log_probs(tiny_llama::prompt(), {{&adapter, 1.0f}});
  const double to_merged = max_diff(with, merged_log_probs({{1.0, &saved}}, "token_embd"));
  const double to_bare = max_diff(with, bare_log_probs());
  RecordProperty("max_abs_logprob_diff_to_merged", std::to_string(to_merged));
  EXPECT_LE(to_merged, 1e-4);
  EXPECT_GE(to_bare, 1e-2);
  // The control: the linear module alone, with the table left as it was, is not it.
  std::map<std::string, lora::LoRAAdapter<float>> linear_only{
      {"blk.0.attn_q.weight", saved.at("blk.0.attn_q.weight")}};
  EXPECT_GE(max_diff(with, merged_log_probs({{1.0, &linear_only}}, "token_embd_control")), 1e-2);
}

TEST(GgufAdapter, TokenEmbeddingAdapterOnATiedHeadIsRefused) {
  tiny_llama::Model tied = model();
  tied.weights.erase("output.weight");  // llama.cpp then multiplies by token_embd for the logits
  const std::string base = gguf_test::tmp_path("tied_base.gguf");
  tiny_llama::writer(tied).save(base);
  const GgufFile tied_file = GgufFile::load(base);
  lora::LoRAEmbedding<float> embedding(model().weights.at("token_embd.weight"), lora::LoRAConfig{});
  lora::gguf::SaveOptions o;
  o.base = &tied_file;
  try {
    lora::gguf::write_adapter<float>(gguf_test::tmp_path("tied_adapter.gguf"),
                                     {{"token_embd.weight", &embedding.adapter("default")}}, o);
    ADD_FAILURE() << "a token_embd adapter on a tied head was written";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("untie"), std::string::npos) << e.what();
  }
  // A linear layer's adapter for token_embd (A: r x n_embd) has the wrong shape for it.
  lora::LoRALinear<float> wrong(model().weights.at("token_embd.weight"), lora::LoRAConfig{});
  o.base = &base_file();
  EXPECT_THROW(lora::gguf::write_adapter<float>(gguf_test::tmp_path("wrong_embd.gguf"),
                                                {{"token_embd.weight", &wrong.adapter()}}, o),
               std::invalid_argument);
}

TEST(GgufAdapter, TwoAdaptersAtHalfScale) {
  const Layers l1 = train(standard_configs(), 2), l2 = train(standard_configs(2), 3);
  const std::string p1 = gguf_test::tmp_path("adapter_half1.gguf"),
                    p2 = gguf_test::tmp_path("adapter_half2.gguf");
  save(p1, l1);
  save(p2, l2);
  const auto s1 = as_saved(p1), s2 = as_saved(p2);
  llama_cpp::Adapter a1(llama_base(), p1), a2(llama_base(), p2);
  const Eigen::MatrixXd with =
      llama_base().log_probs(tiny_llama::prompt(), {{&a1, 0.5f}, {&a2, 0.5f}});
  EXPECT_LE(max_diff(with, merged_log_probs({{0.5, &s1}, {0.5, &s2}}, "half")), 1e-4);
  EXPECT_GE(max_diff(with, bare_log_probs()), 1e-2);
}

TEST(GgufAdapter, RoundedTypesWithinTheirRounding) {
  // The merged base is built from what the file holds (lora's reading of the rounded tensors);
  // what remains is llama.cpp's rounding of the activations that meet f16/bf16/q8_0 weights
  // (ggml converts them to the weight's type, or to q8_0 blocks for q8_0), relative to the
  // adapter's effect: the tolerance is a fraction of the distance to the bare base.
  const Layers layers = train(standard_configs(32), 4);
  const struct {
    GgmlType type;
    double tolerance;
  } cases[] = {{GgmlType::F16, 0.002}, {GgmlType::BF16, 0.01}, {GgmlType::Q8_0, 0.02}};
  for (const auto& c : cases) {
    const std::string name = lora::io::ggml_type_traits(c.type).name;
    SCOPED_TRACE(name);
    const std::string path = gguf_test::tmp_path("adapter_" + name + ".gguf");
    save(path, layers, c.type);
    EXPECT_EQ(GgufFile::load(path).info("blk.0.attn_q.weight.lora_b").type, c.type);
    const auto saved = as_saved(path);
    llama_cpp::Adapter adapter(llama_base(), path);
    const Eigen::MatrixXd with = llama_base().log_probs(tiny_llama::prompt(), {{&adapter, 1.0f}});
    const double d = max_diff(with, merged_log_probs({{1.0, &saved}}, name));
    const double effect = max_diff(with, bare_log_probs());
    RecordProperty("max_abs_logprob_diff_" + name, std::to_string(d));
    EXPECT_LE(d, c.tolerance * effect) << "effect " << effect;
    EXPECT_GE(effect, 1e-2);
    std::printf("%s adapter: |llama.cpp - merged| = %.3g, adapter effect %.3g\n", name.c_str(), d,
                effect);
  }
  // q8_0 needs whole blocks: rank 4 is refused, saying why.
  const Layers small = train({{"blk.0.attn_q.weight", standard_configs(4).begin()->second}}, 5);
  try {
    save(gguf_test::tmp_path("adapter_q8_r4.gguf"), small, GgmlType::Q8_0);
    ADD_FAILURE() << "q8_0 with rank 4 was written";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("multiples of 32"), std::string::npos) << e.what();
  }
}

TEST(GgufAdapter, RsLoraAndPerModuleAlphasAreFoldedIntoB) {
  std::map<std::string, lora::LoRAConfig> configs;
  auto cfg = [](int r, double alpha, bool rs) {
    lora::LoRAConfig c;
    c.rank = r;
    c.alpha = alpha;
    c.use_rslora = rs;
    return c;
  };
  configs["blk.0.attn_q.weight"] = cfg(4, 8, false);   // s r = 8
  configs["blk.0.attn_v.weight"] = cfg(8, 16, false);  // s r = 16
  configs["blk.1.attn_k.weight"] = cfg(2, 4, false);   // s r = 4
  configs["blk.1.ffn_down.weight"] = cfg(4, 8, true);  // rsLoRA: s r = 8 sqrt(4) = 16
  configs["output.weight"] = cfg(16, 16, true);        // rsLoRA: s r = 16 sqrt(16) = 64
  configs["blk.0.ffn_up.weight"] = cfg(8, 16, false);  // s r = 16
  const Layers layers = train(configs, 6);
  const std::string path = gguf_test::tmp_path("adapter_rslora.gguf");
  save(path, layers);
  const auto file = lora::gguf::read_adapter<float>(path);
  EXPECT_EQ(file.alpha, 16.0f);  // what most modules share
  EXPECT_EQ(
      file.folded_modules,
      (std::vector<std::string>{"blk.0.attn_q.weight", "blk.1.attn_k.weight", "output.weight"}));
  for (const auto& [name, l] : layers) {  // the product s B A is kept, whatever is folded
    const auto& a = file.modules.at(name);
    const Eigen::MatrixXf theirs = a.scaling() * a.B() * a.A(), ours = l.scaling() * l.B() * l.A();
    EXPECT_LE((theirs - ours).cwiseAbs().maxCoeff(), 1e-5f * ours.cwiseAbs().maxCoeff()) << name;
  }
  // The merged base uses lora's own scalings and factors, not the file's.
  std::map<std::string, lora::LoRAAdapter<float>> own;
  for (const auto& [name, l] : layers) own.emplace(name, l.adapter());
  llama_cpp::Adapter adapter(llama_base(), path);
  const Eigen::MatrixXd with = llama_base().log_probs(tiny_llama::prompt(), {{&adapter, 1.0f}});
  EXPECT_LE(max_diff(with, merged_log_probs({{1.0, &own}}, "rslora")), 1e-4);
  EXPECT_GE(max_diff(with, bare_log_probs()), 1e-2);
}

TEST(GgufAdapter, RoundTripThroughLayers) {
  Layers layers = train(standard_configs(), 7);
  const std::string path = gguf_test::tmp_path("adapter_roundtrip.gguf");
  auto& q = layers.at("blk.0.attn_q.weight");
  auto& v = layers.at("blk.0.attn_v.weight");
  lora::gguf::SaveOptions o;
  o.architecture = "llama";
  lora::gguf::save_adapter(path, {{"blk.0.attn_q.weight", &q}, {"blk.0.attn_v.weight", &v}}, o);
  lora::LoRALinear<float> q2(model().weights.at("blk.0.attn_q.weight"), lora::LoRAConfig{}),
      v2(model().weights.at("blk.0.attn_v.weight"), lora::LoRAConfig{});
  lora::gguf::load_adapter(path, {{"blk.0.attn_q.weight", &q2}, {"blk.0.attn_v.weight", &v2}});
  const Eigen::MatrixXf X = Eigen::MatrixXf::Random(64, 5);
  EXPECT_EQ(q2.forward(X), q.forward(X));
  EXPECT_EQ(v2.forward(X), v.forward(X));
  auto made = lora::gguf::make_layers<float>(path, base_file());
  EXPECT_EQ(made.size(), 2u);
  EXPECT_EQ(made.at("blk.0.attn_q.weight").forward(X), q.forward(X));
  // A layer without a module, or a module without a layer: refused before anything changes.
  EXPECT_THROW(lora::gguf::load_adapter(path, {{"blk.0.attn_q.weight", &q2}}),
               lora::io::FormatError);
  EXPECT_THROW(
      lora::gguf::load_adapter(path, {{"blk.0.attn_q.weight", &q2},
                                      {"blk.0.attn_v.weight", &v2},
                                      {"blk.0.attn_k.weight", &layers.at("blk.0.attn_k.weight")}}),
      lora::io::FormatError);
}

TEST(GgufAdapter, WriterRefusesWhatLlamaCppCannotExpress) {
  lora::LoRAConfig dora;
  dora.rank = 4;
  dora.use_dora = true;
  lora::LoRALinear<float> d(model().weights.at("blk.0.attn_q.weight"), dora);
  lora::gguf::SaveOptions o;
  o.architecture = "llama";
  const std::string path = gguf_test::tmp_path("refused.gguf");
  try {
    lora::gguf::save_adapter(path, {{"blk.0.attn_q.weight", &d}}, o);
    ADD_FAILURE();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("DoRA"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("merge it into the base"), std::string::npos);
  }
  lora::LoRALinear<float> plain(model().weights.at("blk.0.attn_q.weight"), lora::LoRAConfig{});
  // No architecture, or a module the base does not have / of another shape.
  EXPECT_THROW(lora::gguf::save_adapter(path, {{"blk.0.attn_q.weight", &plain}}, {}),
               std::invalid_argument);
  lora::gguf::SaveOptions with_base;
  with_base.base = &base_file();
  EXPECT_THROW(lora::gguf::save_adapter(path, {{"blk.9.attn_q.weight", &plain}}, with_base),
               std::invalid_argument);
  EXPECT_THROW(lora::gguf::save_adapter(path, {{"blk.0.attn_k.weight", &plain}}, with_base),
               std::invalid_argument);
}

// A hand-made adapter file (no checks: the writer's raw API), for the refusals.
std::string raw_adapter(const std::string& tag, const std::string& arch,
                        const std::vector<std::pair<std::string, Eigen::MatrixXf>>& tensors,
                        bool alpha_as_u32 = false) {
  lora::io::GgufWriter w;
  w.set_value("general.architecture", arch);
  w.set_value("general.type", std::string("adapter"));
  w.set_value("adapter.type", std::string("lora"));
  if (alpha_as_u32)
    w.set_value("adapter.lora.alpha", std::uint32_t{8});
  else
    w.set_value("adapter.lora.alpha", 8.0f);
  for (const auto& [name, m] : tensors) w.add_matrix(name, m, GgmlType::F32);
  const std::string path = gguf_test::tmp_path("raw_" + tag + ".gguf");
  w.save(path);
  return path;
}

TEST(GgufAdapter, FilesLlamaCppRefusesLoraRefusesFirst) {
  const Eigen::MatrixXf A = Eigen::MatrixXf::Constant(4, 64, 0.01f);  // r x k
  const Eigen::MatrixXf B = Eigen::MatrixXf::Constant(64, 4, 0.01f);  // d x r
  const std::string q = "blk.0.attn_q.weight";
  const struct {
    std::string tag, path, needle;
  } cases[] = {
      {"arch", raw_adapter("arch", "qwen2", {{q + ".lora_a", A}, {q + ".lora_b", B}}),
       "architecture \"qwen2\""},
      {"missing",
       raw_adapter("missing", "llama",
                   {{"blk.5.attn_q.weight.lora_a", A}, {"blk.5.attn_q.weight.lora_b", B}}),
       "has no tensor \"blk.5.attn_q.weight\""},
      {"half", raw_adapter("half", "llama", {{q + ".lora_a", A}}), "half a pair"},
      {"shape",
       raw_adapter("shape", "llama",
                   {{"blk.0.attn_k.weight.lora_a", A}, {"blk.0.attn_k.weight.lora_b", B}}),
       "has ne [64, 32]"},
      {"suffix", raw_adapter("suffix", "llama", {{q + ".lora_c", A}}), "neither a .lora_a"},
      {"transposed", raw_adapter("transposed", "llama", {{q + ".lora_a", A}, {q + ".lora_b", A}}),
       "ranks differ"},
  };
  lora::gguf::ReadOptions o;
  o.base = &base_file();
  for (const auto& c : cases) {
    SCOPED_TRACE(c.tag);
    try {
      lora::gguf::read_adapter<float>(c.path, o);
      ADD_FAILURE() << "lora accepted it";
    } catch (const lora::io::FormatError& e) {
      EXPECT_NE(std::string(e.what()).find(c.needle), std::string::npos) << e.what();
    }
    EXPECT_THROW(llama_cpp::Adapter(llama_base(), c.path), llama_cpp::Refused);
  }
  // adapter.lora.alpha as u32 makes llama.cpp abort the process; lora refuses it (not shown to
  // llama.cpp here, for that reason).
  const std::string u32 =
      raw_adapter("u32", "llama", {{q + ".lora_a", A}, {q + ".lora_b", B}}, true);
  EXPECT_THROW(lora::gguf::read_adapter<float>(u32), lora::io::FormatError);
}

TEST(GgufAdapter, ReadsAnAdapterWrittenByGgml) {
  // As convert_lora_to_gguf.py writes one (through gguf-py): ggml's own writer, f16 tensors.
  ggml_init_params p{4 * 1024 * 1024, nullptr, false};
  ggml_context* ctx = ggml_init(p);
  gguf_context* g = gguf_init_empty();
  gguf_set_val_str(g, "general.architecture", "llama");
  gguf_set_val_str(g, "general.type", "adapter");
  gguf_set_val_str(g, "adapter.type", "lora");
  gguf_set_val_f32(g, "adapter.lora.alpha", 16.0f);
  const int r = 8, k = 128, d = 64;  // blk.1.ffn_down: 64 x 128
  ggml_tensor* a = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, k, r);
  ggml_tensor* b = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, r, d);
  ggml_set_name(a, "blk.1.ffn_down.weight.lora_a");
  ggml_set_name(b, "blk.1.ffn_down.weight.lora_b");
  std::vector<float> av(static_cast<std::size_t>(r * k)), bv(static_cast<std::size_t>(d * r));
  for (std::size_t i = 0; i < av.size(); ++i) av[i] = 0.1f * std::sin(0.3f * static_cast<float>(i));
  for (std::size_t i = 0; i < bv.size(); ++i) bv[i] = 0.2f * std::cos(0.7f * static_cast<float>(i));
  ggml_fp32_to_fp16_row(av.data(), static_cast<ggml_fp16_t*>(a->data), r * k);
  ggml_fp32_to_fp16_row(bv.data(), static_cast<ggml_fp16_t*>(b->data), d * r);
  gguf_add_tensor(g, a);
  gguf_add_tensor(g, b);
  const std::string path = gguf_test::tmp_path("ggml_adapter.gguf");
  ASSERT_TRUE(gguf_write_to_file(g, path.c_str(), false));
  gguf_free(g);
  ggml_free(ctx);

  lora::gguf::ReadOptions o;
  o.base = &base_file();
  const auto file = lora::gguf::read_adapter<float>(path, o);
  const auto& m = file.modules.at("blk.1.ffn_down.weight");
  EXPECT_EQ(m.rank(), r);
  EXPECT_FLOAT_EQ(m.scaling(), 2.0f);
  EXPECT_NEAR(m.A()(1, 2), 0.1f * std::sin(0.3f * 130), 1e-3);  // row-major: [r][k]
  EXPECT_NEAR(m.B()(3, 5), 0.2f * std::cos(0.7f * 29), 1e-3);   // [d][r]
  llama_cpp::Adapter adapter(llama_base(), path);
  const Eigen::MatrixXd with = llama_base().log_probs(tiny_llama::prompt(), {{&adapter, 1.0f}});
  // f16 weights: ggml rounds the activations they meet to f16 (relative 2^-11).
  const double effect = max_diff(with, bare_log_probs());
  EXPECT_LE(max_diff(with, merged_log_probs({{1.0, &file.modules}}, "ggml")), 0.01 * effect);
  EXPECT_GE(effect, 1e-2);
}

}  // namespace test_gguf_adapter
