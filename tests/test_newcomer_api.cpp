// The newcomer API: layers built straight from a PEFT adapter directory (checked against PEFT's own
// outputs in tests/fixtures/peft), save_adapter / load_adapter with a braced list and missing
// parent folders, and lora::summary against a hand count.
#include "test_helpers.hpp"

#include <lora/core.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/peft.hpp>

#include <sys/stat.h>

#include <algorithm>
#include <limits>
#include <map>
#include <sstream>
#include <string>

namespace test_newcomer_api {
namespace {

using lora::io::FormatError;
using lora::io::SafeTensors;

/// PEFT's base weights, biases, inputs and outputs of the fixture `<name>_modules.safetensors`
/// (rows per sample there; columns per sample here).
struct Base {
  lora::peft::BaseWeights<float> weights;
  lora::peft::BaseBiases<float> biases;
  std::map<std::string, Eigen::MatrixXf> x, y;
};

Base load_base(const std::string& name) {
  const SafeTensors st =
      SafeTensors::load(lora::test::fixture_path("peft/" + name + "_modules.safetensors"));
  Base b;
  const std::string prefix = "base_model/model/";
  for (const auto& key : st.names()) {
    if (key.size() < 3 || key.compare(key.size() - 3, 3, "/W0") != 0) continue;
    const std::string base = key.substr(0, key.size() - 3);
    std::string path = base.substr(prefix.size());
    std::replace(path.begin(), path.end(), '/', '.');
    b.weights[path] = st.matrix<float>(key);
    if (st.contains(base + "/bias")) b.biases[path] = st.vector<float>(base + "/bias");
    b.x[path] = st.matrix<float>(base + "/x").transpose();
    b.y[path] = st.matrix<float>(base + "/y").transpose();
  }
  return b;
}

std::string adapter_dir(const std::string& name) {
  return lora::test::fixture_path("peft/" + name);
}

std::string tmp_path(const std::string& name) {
  const std::string root = LORA_TEST_TMP_DIR;
  ::mkdir(root.c_str(), 0777);
  return root + "/newcomer_" + name;
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
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

// ---- make_layers -------------------------------------------------------------------------------

TEST(MakeLayers, RankPatternFixtureGivesPeftsRanksAndOutputs) {
  const Base b = load_base("llama_pattern_adapter");
  ASSERT_FALSE(b.weights.empty());
  const auto layers =
      lora::peft::make_layers(adapter_dir("llama_pattern_adapter"), b.weights, b.biases);
  ASSERT_EQ(layers.size(), b.weights.size());
  // The ranks PEFT's rank_pattern gives (as test_peft_adapter checks after load_adapter).
  EXPECT_EQ(layers.at("model.layers.0.mlp.down_proj").rank(), 4);
  EXPECT_EQ(layers.at("model.layers.1.self_attn.v_proj").rank(), 2);
  EXPECT_EQ(layers.at("model.layers.0.self_attn.v_proj").rank(), 8);
  EXPECT_FLOAT_EQ(layers.at("model.layers.1.self_attn.v_proj").scaling(), 8.0f);  // 16 / 2
  for (const auto& [path, layer] : layers)
    EXPECT_MATRIX_NEAR(layer.forward(b.x.at(path)), b.y.at(path), 1e-5) << path;
}

TEST(MakeLayers, LlamaFixtureAsMultiLayersWithAName) {
  const Base b = load_base("llama_adapter");
  auto layers =
      lora::peft::make_multi_layers(adapter_dir("llama_adapter"), b.weights, "task", b.biases);
  ASSERT_EQ(layers.size(), 8u);
  for (auto& [path, layer] : layers) {
    EXPECT_EQ(layer.active_name(), "task");
    EXPECT_EQ(layer.adapter("task").rank(), 4);
    EXPECT_MATRIX_NEAR(layer.forward(b.x.at(path)), b.y.at(path), 1e-5) << path;
  }
}

TEST(MakeLayers, ErrorsNameTheModuleAndTheClosestNames) {
  const Base b = load_base("llama_adapter");
  const std::string dir = adapter_dir("llama_adapter");
  {  // a typo in a base weight's name
    auto w = b.weights;
    auto node = w.extract("model.layers.0.self_attn.q_proj");
    node.key() = "model.layers.0.self_attn.q_prj";
    w.insert(std::move(node));
    expect_error([&] { lora::peft::make_layers(dir, w); }, "\"model.layers.0.self_attn.q_prj\"");
    expect_error([&] { lora::peft::make_layers(dir, w); },
                 "closest first: \"model.layers.0.self_attn.q_proj\"");
    EXPECT_THROW(lora::peft::make_layers(dir, w), FormatError);
  }
  {  // a module of the file without a base weight
    auto w = b.weights;
    const std::string missing = w.begin()->first;
    w.erase(missing);
    expect_error([&] { lora::peft::make_layers(dir, w); },
                 "adapts module \"" + missing + "\" but no base weight");
  }
  {  // a base weight of the wrong shape
    auto w = b.weights;
    auto& W = w.at("model.layers.0.self_attn.k_proj");
    W.conservativeResize(W.rows() + 1, W.cols());
    EXPECT_THROW(lora::peft::make_layers(dir, w), FormatError);
  }
  {  // a bias of the wrong length
    lora::peft::BaseBiases<float> bias;
    bias["model.layers.0.self_attn.k_proj"] = Eigen::VectorXf::Zero(1);
    EXPECT_THROW(lora::peft::make_layers(dir, b.weights, bias), std::invalid_argument);
  }
  EXPECT_THROW(lora::peft::make_layers(tmp_path("no_such_dir"), b.weights), FormatError);
}

// ---- save_adapter / load_adapter ---------------------------------------------------------------

lora::LoRALinear<float> trained_layer(Eigen::Index d, Eigen::Index k, int rank, unsigned seed) {
  lora::LoRAConfig cfg;
  cfg.rank = rank;
  cfg.alpha = 2.0 * rank;
  lora::Rng rng(seed);
  lora::LoRALinear<float> layer(Eigen::MatrixXf::Random(d, k), cfg);
  layer.B() = Eigen::MatrixXf::Random(d, rank);  // not zero, so a lost adapter shows
  return layer;
}

TEST(SaveAdapter, BracedListAndMissingParentsThenLoadWithBracedList) {
  auto fc1 = trained_layer(6, 4, 2, 1);
  auto fc2 = trained_layer(3, 6, 3, 2);
  const std::string dir = tmp_path("braced") + "/a/b/adapter";
  lora::peft::save_adapter(dir, {{"fc1", &fc1}, {"fc2", &fc2}});
  EXPECT_TRUE(exists(dir + "/adapter_config.json"));
  EXPECT_TRUE(exists(dir + "/adapter_model.safetensors"));

  // Fresh layers of another rank get the saved values.
  auto g1 = trained_layer(6, 4, 1, 3);
  auto g2 = trained_layer(3, 6, 1, 4);
  lora::peft::load_adapter(dir, {{"fc1", &g1}, {"fc2", &g2}});
  EXPECT_EQ(g1.rank(), 2);
  EXPECT_EQ(g2.rank(), 3);
  EXPECT_TRUE(g1.A() == fc1.A() && g1.B() == fc1.B());
  EXPECT_TRUE(g2.A() == fc2.A() && g2.B() == fc2.B());
  EXPECT_EQ(g2.scaling(), fc2.scaling());

  // And layers built straight from the file, with the same base weights, give the same outputs.
  const auto built = lora::peft::make_layers<float>(
      dir, {{"fc1", fc1.frozen().weight()}, {"fc2", fc2.frozen().weight()}});
  const Eigen::MatrixXf X = Eigen::MatrixXf::Random(4, 5);
  EXPECT_TRUE(built.at("fc2").forward(built.at("fc1").forward(X)) == fc2.forward(fc1.forward(X)));
}

TEST(SaveAdapter, BracedListOfDoubleLayersAndOfConstLayers) {
  lora::LoRAConfig cfg;
  cfg.rank = 2;
  lora::LoRALinear<double> a(Eigen::MatrixXd::Random(4, 4), cfg);
  a.B().setRandom();
  const lora::LoRALinear<double>& ca = a;
  const std::string dir = tmp_path("braced_double");
  lora::peft::save_adapter(dir, {{"a", &ca}});
  lora::LoRALinear<double> b(Eigen::MatrixXd::Random(4, 4), cfg);
  lora::peft::load_adapter(dir, {{"a", &b}});
  EXPECT_TRUE(b.B() == a.B() && b.A() == a.A());
  // A const layer cannot be loaded into; float and double layers do not mix.
  expect_error([&] { lora::peft::load_adapter(dir, {{"a", &ca}}); }, "is const");
  auto f = trained_layer(4, 4, 2, 5);
  expect_error([&] { lora::peft::save_adapter(dir, {{"a", &a}, {"f", &f}}); }, "mix float");
}

TEST(SaveAdapter, BracedListOfMultiLayersWithAName) {
  lora::LoRAConfig cfg;
  cfg.rank = 2;
  lora::MultiLoRALinear<float> m1(Eigen::MatrixXf::Random(6, 4)), m2(Eigen::MatrixXf::Random(3, 6));
  m1.add_adapter("a", cfg).B().setRandom();
  m2.add_adapter("a", cfg).B().setRandom();
  const std::string dir = tmp_path("braced_multi");
  lora::peft::save_adapter(dir, {{"fc1", &m1}, {"fc2", &m2}}, "a");

  lora::MultiLoRALinear<float> n1(m1.frozen().weight()), n2(m2.frozen().weight());
  lora::peft::load_adapter(dir, {{"fc1", &n1}, {"fc2", &n2}}, "b");
  ASSERT_TRUE(n1.has_adapter("b") && n2.has_adapter("b"));
  EXPECT_TRUE(n1.adapter("b").A() == m1.adapter("a").A());
  EXPECT_TRUE(n2.adapter("b").B() == m2.adapter("a").B());
  // Again under the same name: refused before anything is added.
  expect_error(
      [&] {
        lora::peft::load_adapter(dir, {{"fc1", &n1}, {"fc2", &n2}}, "b");
      },
      "already has an adapter named \"b\"");
  EXPECT_EQ(n1.adapter_count(), 1u);
  // A MultiLoRALinear needs the adapter's name, a LoRALinear must not get one.
  expect_error(
      [&] {
        lora::peft::load_adapter(dir, {{"fc1", &n1}, {"fc2", &n2}});
      },
      "give the adapter's name");
  auto single = trained_layer(6, 4, 2, 9);
  expect_error([&] { lora::peft::save_adapter(dir, {{"fc1", &single}}, "a"); }, "is a LoRALinear");
}

TEST(LoadAdapter, BracedListIsAllOrNothingWithTheClosestNames) {
  auto fc1 = trained_layer(6, 4, 2, 1);
  const std::string dir = tmp_path("braced_typo");
  lora::peft::save_adapter(dir, {{"encoder.fc1", &fc1}});
  auto g = trained_layer(6, 4, 1, 7);
  const Eigen::MatrixXf A = g.A();
  expect_error(
      [&] {
        lora::peft::load_adapter(dir, {{"encoder.fc", &g}});
      },
      "closest first: \"encoder.fc1\"");
  EXPECT_TRUE(g.A() == A);  // untouched
  g.merge();
  EXPECT_THROW(lora::peft::load_adapter(dir, {{"encoder.fc1", &g}}), std::logic_error);
}

TEST(SaveAdapter, FailedSaveLeavesNoNewFolder) {
  auto fc1 = trained_layer(6, 4, 2, 1);
  fc1.B()(0, 0) = std::numeric_limits<float>::quiet_NaN();  // refused before anything is written
  const std::string top = tmp_path("failed");
  EXPECT_THROW(lora::peft::save_adapter(top + "/x/y", {{"fc1", &fc1}}), std::domain_error);
  EXPECT_FALSE(exists(top));

  // A failure after two folders were made (the third name is too long for the file system)
  // removes them again.
  fc1.B()(0, 0) = 0.0f;
  EXPECT_THROW(lora::peft::save_adapter(top + "/x/" + std::string(300, 'n'), {{"fc1", &fc1}}),
               lora::io::WriteError);
  EXPECT_FALSE(exists(top));
}

// ---- summary -----------------------------------------------------------------------------------

TEST(Summary, CountsByHandForMapsOfLayersAndOfPointers) {
  lora::LoRAConfig cfg;
  cfg.rank = 2;
  // fc1: W0 8 x 5 with a bias; fc2: W0 3 x 8 without.
  lora::LoRALinear<float> fc1(Eigen::MatrixXf::Zero(8, 5), Eigen::VectorXf::Zero(8), cfg);
  cfg.rank = 1;
  lora::LoRALinear<float> fc2(Eigen::MatrixXf::Zero(3, 8), cfg);
  // trainable: 2 * (8 + 5) + 1 * (3 + 8) = 26 + 11 = 37; frozen: 40 + 8 + 24 = 72; all: 109.
  const std::map<std::string, const lora::LoRALinear<float>*> pointers{{"fc1", &fc1},
                                                                       {"fc2", &fc2}};
  const lora::ParameterSummary s = lora::summary(pointers);
  EXPECT_EQ(s.trainable, 37);
  EXPECT_EQ(s.total, 109);
  EXPECT_NEAR(s.trainable_percent(), 100.0 * 37 / 109, 1e-12);
  EXPECT_EQ(s.to_string(), "trainable params: 37 || all params: 109 || trainable%: 33.9450");

  std::map<std::string, lora::LoRALinear<float>> layers;
  layers.emplace("fc1", fc1);
  layers.emplace("fc2", fc2);
  EXPECT_EQ(lora::summary(layers).total, 109);

  std::ostringstream os;
  os << s;
  EXPECT_EQ(os.str(), s.to_string());

  const std::map<std::string, lora::LoRALinear<float>*> null{{"fc1", nullptr}};
  EXPECT_THROW(lora::summary(null), std::invalid_argument);
  EXPECT_EQ(lora::summary(std::map<std::string, lora::LoRALinear<float>*>{}).to_string(),
            "trainable params: 0 || all params: 0 || trainable%: 0.0000");
}

TEST(Summary, GroupsThousandsAsPeftAndCountsEveryAdapterOfAMultiLayer) {
  // W0 1000 x 1000 (1,000,000) with two adapters of rank 4 and 8: 8,000 + 16,000 trainable.
  lora::MultiLoRALinear<float> layer(Eigen::MatrixXf::Zero(1000, 1000));
  lora::LoRAConfig cfg;
  cfg.rank = 4;
  layer.add_adapter("a", cfg);
  cfg.rank = 8;
  layer.add_adapter("b", cfg);
  const std::map<std::string, lora::MultiLoRALinear<float>*> layers{{"x", &layer}};
  EXPECT_EQ(lora::summary(layers).to_string(),
            "trainable params: 24,000 || all params: 1,024,000 || trainable%: 2.3438");
}

}  // namespace
}  // namespace test_newcomer_api
