// QLoRA on llama.cpp's quantized files, judged by llama.cpp. A tiny llama (n_embd 256, so that
// every weight is whole k-quant super-blocks) is written with its weights in Q4_K, Q6_K, Q8_0 and
// Q4_0 (the blocks checked against ggml_quantize_chunk's); adapters are trained by lora on the
// blocks as stored (GgmlFrozenWeight) and rebuilt from their file by make_layers on the quantized
// base. Then, in llama.cpp: the quantized base with the adapter gives the next-token
// probabilities of the base whose adapted weights were merged here, independently (ggml's own
// to_float, plus s B A in double, written as f32), to 1e-3; and the merged model lora writes
// (write_merged_model) is that model, or in a picked type (F16, Q8_0, Q4_0) the blocks ggml's
// quantizer makes of the merged weight.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "ggml.h"
#include "gguf_test_files.hpp"
#include "llama_cpp_client.hpp"
#include "lora/ggml_frozen_weight.hpp"
#include "lora/gguf.hpp"
#include "lora/optim.hpp"
#include "tiny_llama.hpp"

namespace test_gguf_quantized {

using lora::GgmlFrozenWeight;
using lora::io::GgmlType;
using lora::io::GgufFile;
using QLayer = lora::LoRALinear<float, GgmlFrozenWeight>;
using QLayers = std::map<std::string, QLayer>;

tiny_llama::Config config() {
  tiny_llama::Config c;
  c.n_embd = 256;
  c.n_ff = 512;
  return c;
}

const tiny_llama::Model& model() {
  // The tiny llama's attention and head scaled down (its softmaxes less sharp), so that
  // llama.cpp's own 8-bit rounding of activations moves its probabilities by well under 1%.
  static const tiny_llama::Model m = [] {
    tiny_llama::Model m = tiny_llama::make(11, config());
    for (int i = 0; i < m.config.n_layer; ++i)
      for (const char* t : {"attn_q", "attn_k"}) m.weights[tiny_llama::block(i, t)] *= 0.5f;
    m.weights["output.weight"] *= 0.5f;
    return m;
  }();
  return m;
}

std::string type_name(GgmlType t) {
  return lora::io::ggml_type_traits(t).name;
}

// ggml's own dequantization of tensor `name` (rows = ne[1], cols = ne[0]), in double.
Eigen::MatrixXd ggml_dequantized(const GgufFile& f, const std::string& name) {
  const auto& t = f.info(name);
  std::vector<float> v(static_cast<std::size_t>(t.ne[0] * t.ne[1]));
  ggml_get_type_traits(static_cast<ggml_type>(t.type))
      ->to_float(f.data(name), v.data(), static_cast<std::int64_t>(v.size()));
  using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  return Eigen::Map<const RowMajor>(v.data(), t.ne[1], t.ne[0]).cast<double>();
}

// ggml_quantize_chunk's blocks of W (out x in, rows as a GGUF tensor stores them).
std::vector<std::uint8_t> ggml_quantized(const Eigen::MatrixXf& W, GgmlType type) {
  const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> rows = W;
  const auto gt = static_cast<ggml_type>(type);
  std::vector<std::uint8_t> out(ggml_row_size(gt, W.cols()) * static_cast<std::size_t>(W.rows()));
  ggml_quantize_chunk(gt, rows.data(), out.data(), 0, W.rows(), W.cols(), nullptr);
  return out;
}

std::vector<std::string> adapted() {
  return {"blk.0.attn_q.weight",      "blk.0.attn_k.weight",   "blk.0.attn_v.weight",
          "blk.1.attn_output.weight", "blk.0.ffn_gate.weight", "blk.1.ffn_up.weight",
          "blk.1.ffn_down.weight",    "output.weight"};
}

// Layers on the blocks of `base` as stored, trained a few AdamW steps on a regression toward
// random targets, so that every B is far from zero.
QLayers train(const GgufFile& base, unsigned seed) {
  QLayers layers;
  std::mt19937 rng(seed);
  lora::LoRAConfig cfg;
  cfg.rank = 4;
  cfg.alpha = 8;
  for (const auto& name : adapted()) {
    auto& layer = layers.emplace(name, QLayer(lora::gguf::read_ggml_weight(base, name), {}, cfg))
                      .first->second;
    gguf_test::train_toward_random_targets(layer, rng, 0.005);
  }
  return layers;
}

// The base with every adapted weight replaced by ggml's dequantization of its blocks (plus
// s B A, in double, when `merged`), written as f32; the other tensors as stored.
std::string dequantized_base(const GgufFile& base, const QLayers& layers, bool merged,
                             const std::string& tag) {
  auto w = lora::io::GgufWriter::copy_of(base);
  for (const auto& [name, layer] : layers) {
    Eigen::MatrixXd W = ggml_dequantized(base, name);
    if (merged)
      W += static_cast<double>(layer.scaling()) * layer.B().cast<double>() *
           layer.A().cast<double>();
    w.replace_matrix(name, W, GgmlType::F32);
  }
  const std::string path = gguf_test::tmp_path(
      std::string("quantized_") + (merged ? "reference_" : "dequantized_") + tag + ".gguf");
  w.save(path);
  return path;
}
std::string reference_merged(const GgufFile& base, const QLayers& layers, const std::string& tag) {
  return dequantized_base(base, layers, true, tag);
}

double max_diff(const Eigen::MatrixXd& a, const Eigen::MatrixXd& b) {
  return (a - b).cwiseAbs().maxCoeff();
}
double max_prob_diff(const Eigen::MatrixXd& log_a, const Eigen::MatrixXd& log_b) {
  return (log_a.array().exp() - log_b.array().exp()).abs().maxCoeff();
}

class QuantizedBase : public ::testing::TestWithParam<GgmlType> {};

TEST_P(QuantizedBase, TrainedAdapterIsTheMergedBaseInLlamaCpp) {
  const GgmlType type = GetParam();
  const std::string tag = type_name(type);
  const std::string base_path = gguf_test::tmp_path("quantized_base_" + tag + ".gguf");
  tiny_llama::writer(model(), type).save(base_path);
  const GgufFile base = GgufFile::load(base_path);
  // The base's blocks are ggml's quantizer's.
  for (const char* name : {"blk.0.attn_q.weight", "blk.1.ffn_down.weight", "token_embd.weight"}) {
    EXPECT_EQ(base.info(name).type, type) << name;
    EXPECT_EQ(base.raw(name), ggml_quantized(model().weights.at(name), type)) << name;
  }

  const QLayers layers = train(base, 3);
  lora::gguf::SaveOptions save;
  save.base = &base;
  const std::string adapter_path = gguf_test::tmp_path("quantized_adapter_" + tag + ".gguf");
  {
    std::map<std::string, const lora::LoRAAdapter<float>*> adapters;
    for (const auto& [name, l] : layers) adapters.emplace(name, &l.adapter());
    lora::gguf::write_adapter<float>(adapter_path, adapters, save);
  }

  // make_layers rebuilds the layers on the quantized base, its blocks kept as stored.
  const QLayers rebuilt = lora::gguf::make_layers<float, GgmlFrozenWeight>(adapter_path, base);
  ASSERT_EQ(rebuilt.size(), layers.size());
  for (const auto& [name, layer] : layers) {
    const QLayer& r = rebuilt.at(name);
    EXPECT_EQ(r.A(), layer.A()) << name;
    EXPECT_EQ(r.B(), layer.B()) << name;
    EXPECT_FLOAT_EQ(r.scaling(), layer.scaling()) << name;
    EXPECT_EQ(r.frozen().type(), type) << name;
    EXPECT_EQ(r.frozen().packed_bytes(), base.info(name).bytes) << name;
  }

  // llama.cpp, exactly: lora's adapter on the base whose adapted weights are ggml's
  // dequantization in f32 is the reference merged model, to float rounding.
  const Eigen::MatrixXd reference =
      llama_cpp::Model(reference_merged(base, layers, tag)).log_probs(tiny_llama::prompt());
  llama_cpp::Model dequantized(dequantized_base(base, layers, false, tag));
  llama_cpp::Adapter on_dequantized(dequantized, adapter_path);
  const double exact =
      max_diff(dequantized.log_probs(tiny_llama::prompt(), {{&on_dequantized, 1.0f}}), reference);
  RecordProperty("dequantized_base_max_abs_logprob_diff_to_merged", std::to_string(exact));
  EXPECT_LE(exact, 1e-4) << tag;

  // llama.cpp as it serves: lora's adapter on the quantized base. llama.cpp multiplies a quantized
  // weight by activations it rounds to 8 bits (Q8_K or Q8_0 blocks), so even the bare quantized
  // base is not exactly its dequantized weights in f32 (`rounding`, in probability; 0.3% to 0.7%
  // here): the adapted model must be the merged one within 1e-3 plus three times that.
  llama_cpp::Model qmodel(base_path);
  llama_cpp::Adapter adapter(qmodel, adapter_path);
  const Eigen::MatrixXd with = qmodel.log_probs(tiny_llama::prompt(), {{&adapter, 1.0f}});
  const Eigen::MatrixXd bare = qmodel.log_probs(tiny_llama::prompt());
  const double rounding = max_prob_diff(bare, dequantized.log_probs(tiny_llama::prompt()));
  const double to_reference = max_prob_diff(with, reference);
  RecordProperty("activation_rounding_max_abs_prob_diff", std::to_string(rounding));
  RecordProperty("max_abs_prob_diff_to_merged", std::to_string(to_reference));
  EXPECT_LE(to_reference, 1e-3 + 3 * rounding) << tag;
  EXPECT_LE(rounding, 1e-2) << tag;  // the model is not so sharp that the bound says nothing
  EXPECT_GE(max_prob_diff(with, bare), 5e-2) << tag;  // the adapter does move the model

  // lora's merged model, in f32: llama.cpp gives the reference's numbers (up to the rounding of
  // W0 + s B A in float rather than double).
  const std::string merged_path = gguf_test::tmp_path("quantized_merged_" + tag + ".gguf");
  lora::gguf::MergedModelOptions o;
  o.type = GgmlType::F32;
  lora::gguf::write_merged_model(merged_path, base, layers, o);
  const Eigen::MatrixXd merged = llama_cpp::Model(merged_path).log_probs(tiny_llama::prompt());
  EXPECT_LE(max_diff(merged, reference), 1e-4) << tag;
  for (const auto& [name, layer] : layers) EXPECT_FALSE(layer.is_merged()) << name;
}

INSTANTIATE_TEST_SUITE_P(Types, QuantizedBase,
                         ::testing::Values(GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q8_0,
                                           GgmlType::Q4_0),
                         [](const auto& info) { return type_name(info.param); });

// A merged model in a picked type: the adapted weights are the blocks ggml's quantizer makes of
// the merged weight; every other tensor is the base's, byte for byte; llama.cpp serves it.
TEST(MergedModel, WritesThePickedTypeAsGgmlQuantizes) {
  const std::string base_path = gguf_test::tmp_path("merged_pick_base.gguf");
  tiny_llama::writer(model(), GgmlType::Q4_K).save(base_path);
  const GgufFile base = GgufFile::load(base_path);
  QLayers layers = train(base, 5);
  layers.at("blk.0.attn_q.weight").merge();  // a merged layer is written as it serves
  const Eigen::MatrixXd reference =
      llama_cpp::Model(reference_merged(base, layers, "pick")).log_probs(tiny_llama::prompt());

  // Leaving the type empty keeps the base's.
  const GgufFile same = GgufFile::parse(lora::gguf::merged_model_writer(base, layers).serialize());
  for (const auto& name : adapted()) EXPECT_EQ(same.info(name).type, GgmlType::Q4_K) << name;

  lora::gguf::MergedModelOptions f32;
  f32.type = GgmlType::F32;
  const GgufFile exact =
      GgufFile::parse(lora::gguf::merged_model_writer(base, layers, f32).serialize());
  // Bounds on llama.cpp's probabilities against the f32 reference: the type's rounding of the
  // merged weights, and llama.cpp's of the activations they multiply (f16, or 8-bit blocks).
  const std::map<GgmlType, double> bound{
      {GgmlType::F16, 0.02}, {GgmlType::Q8_0, 0.03}, {GgmlType::Q4_0, 0.2}};
  for (const auto& [type, tolerance] : bound) {
    const std::string tag = type_name(type);
    lora::gguf::MergedModelOptions o;
    o.type = type;
    const std::string path = gguf_test::tmp_path("merged_pick_" + tag + ".gguf");
    lora::gguf::write_merged_model(path, base, layers, o);
    const GgufFile f = GgufFile::load(path);
    ASSERT_EQ(f.tensors().size(), base.tensors().size());
    for (const auto& t : base.tensors()) {
      if (layers.count(t.name)) {
        EXPECT_EQ(f.info(t.name).type, type) << t.name;
        const Eigen::MatrixXf W = exact.matrix<float>(t.name);  // lora's merged weight in f32
        if (type == GgmlType::F16) {
          EXPECT_EQ(f.matrix<float>(t.name), W.cast<Eigen::half>().cast<float>()) << t.name;
        } else {
          EXPECT_EQ(f.raw(t.name), ggml_quantized(W, type)) << tag << " " << t.name;
        }
      } else {
        EXPECT_EQ(f.raw(t.name), base.raw(t.name)) << t.name;
      }
    }
    EXPECT_EQ(f.metadata().size(), base.metadata().size());
    const Eigen::MatrixXd lp = llama_cpp::Model(path).log_probs(tiny_llama::prompt());
    const double diff = max_prob_diff(lp, reference);
    RecordProperty("max_abs_prob_diff_" + tag, std::to_string(diff));
    EXPECT_LE(diff, tolerance) << tag;
  }
}

TEST(MergedModel, RefusesWhatItCannotWrite) {
  const std::string base_path = gguf_test::tmp_path("merged_refuse_base.gguf");
  tiny_llama::writer(model(), GgmlType::Q8_0).save(base_path);
  const GgufFile base = GgufFile::load(base_path);
  lora::LoRAConfig cfg;
  cfg.rank = 2;
  auto one = [&](const std::string& name, const lora::LoRAConfig& c) {
    QLayers l;
    l.emplace(name, QLayer(lora::gguf::read_ggml_weight(base, "blk.0.attn_q.weight"), {}, c));
    return l;
  };
  auto message = [&](const QLayers& layers, const lora::gguf::MergedModelOptions& o = {}) {
    try {
      lora::gguf::merged_model_writer(base, layers, o);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no exception");
  };
  EXPECT_NE(message(one("blk.0.attn_z.weight", cfg)).find("no tensor of that name"),
            std::string::npos);
  EXPECT_NE(message(one("blk.0.attn_k.weight", cfg)).find("256 x 256"), std::string::npos)
      << message(one("blk.0.attn_k.weight", cfg));
  lora::gguf::MergedModelOptions q5;
  q5.type = GgmlType::Q5_0;
  EXPECT_NE(message(one("blk.0.attn_q.weight", cfg), q5).find("q5_0"), std::string::npos);
  QLayers with_bias = one("blk.0.attn_q.weight", cfg);
  with_bias.at("blk.0.attn_q.weight").adapter().set_lora_bias(Eigen::VectorXf::Ones(256));
  EXPECT_NE(message(with_bias).find("lora bias"), std::string::npos);

  // A merged value beyond f16: std::domain_error, and no file at the path.
  QLayers big = one("blk.0.attn_q.weight", cfg);
  QLayer& layer = big.at("blk.0.attn_q.weight");
  layer.B().setConstant(1e3f);
  layer.A().setConstant(1e3f);
  const std::string path = gguf_test::tmp_path("merged_refused.gguf");
  std::filesystem::remove(path);
  lora::gguf::MergedModelOptions f16;
  f16.type = GgmlType::F16;
  EXPECT_THROW(lora::gguf::write_merged_model(path, base, big, f16), std::domain_error);
  EXPECT_FALSE(std::filesystem::exists(path));
}

}  // namespace test_gguf_quantized
