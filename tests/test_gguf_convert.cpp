// PEFT <-> GGUF conversion for the llama family, judged by llama.cpp: a PEFT adapter trained on
// the Hugging Face layout of the tiny llama (q_proj/k_proj rows un-permuted), converted by
// `lora-convert peft-to-gguf`, gives in llama.cpp the log-probabilities of the merged model
// (merged in the HF layout, then permuted as llama.cpp's converter permutes a model) to 1e-4; a
// converter without the permutation fails that comparison; gguf-to-peft gives the PEFT tensors
// back.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "gguf_test_files.hpp"
#include "llama_cpp_client.hpp"
#include "lora/gguf.hpp"
#include "lora/gguf/peft_convert.hpp"
#include "lora/optim.hpp"
#include "tiny_llama.hpp"

namespace test_gguf_convert {

using lora::io::GgmlType;
using lora::io::GgufFile;

TEST(GgufConvert, RopePermutationIsLlamaCpps) {
  // convert_hf_to_gguf.py's permute: w.reshape(n_head, 2, d // n_head // 2, k).swapaxes(1, 2)
  // .reshape(w.shape), worked by hand on the row indices:
  //   d 8, 2 heads:  [[[0,1],[2,3]],[[4,5],[6,7]]] -> [[[0,2],[1,3]],[[4,6],[5,7]]]
  //   d 12, 1 head:  [[0..5],[6..11]] -> [[0,6],[1,7],...,[5,11]]
  const std::vector<int> two_heads{0, 2, 1, 3, 4, 6, 5, 7};
  const std::vector<int> one_head{0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11};
  for (const auto& [order, n_head] : {std::make_pair(two_heads, 2), std::make_pair(one_head, 1)}) {
    const int d = static_cast<int>(order.size());
    Eigen::MatrixXd rows(d, 3);
    for (int i = 0; i < d; ++i) rows.row(i) << i, 10 * i, -i;
    const Eigen::MatrixXd p = lora::gguf::rope_permute_rows(rows, n_head);
    for (int i = 0; i < d; ++i) EXPECT_EQ(p(i, 0), order[static_cast<std::size_t>(i)]) << i;
    EXPECT_EQ(lora::gguf::rope_permute_rows(p, n_head, true), rows);
  }
  EXPECT_THROW(lora::gguf::rope_permute_rows(Eigen::MatrixXd::Zero(6, 2), 2),
               std::invalid_argument);
}

TEST(GgufConvert, Names) {
  using lora::gguf::gguf_to_peft_name;
  using lora::gguf::peft_to_gguf_name;
  const std::pair<const char*, const char*> names[] = {
      {"model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"},
      {"model.layers.12.self_attn.k_proj", "blk.12.attn_k.weight"},
      {"model.layers.3.self_attn.v_proj", "blk.3.attn_v.weight"},
      {"model.layers.3.self_attn.o_proj", "blk.3.attn_output.weight"},
      {"model.layers.1.mlp.gate_proj", "blk.1.ffn_gate.weight"},
      {"model.layers.1.mlp.up_proj", "blk.1.ffn_up.weight"},
      {"model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight"},
      {"lm_head", "output.weight"},
      {"model.embed_tokens", "token_embd.weight"}};
  for (const auto& [peft, gguf] : names) {
    EXPECT_EQ(peft_to_gguf_name(peft), std::optional<std::string>(gguf));
    EXPECT_EQ(gguf_to_peft_name(gguf), std::optional<std::string>(peft));
  }
  EXPECT_FALSE(peft_to_gguf_name("model.layers.0.self_attn.rotary_emb"));
  EXPECT_FALSE(gguf_to_peft_name("blk.0.attn_norm.weight"));
}

struct Fixture {
  tiny_llama::Model model = tiny_llama::make(11);
  std::string base_path = gguf_test::tmp_path("convert_base.gguf");
  std::string peft_dir = gguf_test::tmp_path("convert_peft");
  std::map<std::string, Eigen::MatrixXf> hf;              // PEFT module path -> W0 in the HF layout
  std::map<std::string, lora::LoRALinear<float>> layers;  // by PEFT module path

  Fixture() {
    tiny_llama::writer(model).save(base_path);
    const tiny_llama::Config& c = model.config;
    const std::pair<const char*, const char*> modules[] = {
        {"model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"},
        {"model.layers.0.self_attn.k_proj", "blk.0.attn_k.weight"},
        {"model.layers.1.self_attn.q_proj", "blk.1.attn_q.weight"},
        {"model.layers.1.self_attn.k_proj", "blk.1.attn_k.weight"},
        {"model.layers.0.self_attn.v_proj", "blk.0.attn_v.weight"},
        {"model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight"}};
    std::mt19937 rng(5);
    std::normal_distribution<float> normal;
    for (const auto& [path, tensor] : modules) {
      Eigen::MatrixXf W = model.weights.at(tensor);
      // The HF layout is the GGUF one with the permutation undone.
      if (std::string(tensor).find("attn_q") != std::string::npos)
        W = lora::gguf::rope_permute_rows(W, c.n_head, true);
      if (std::string(tensor).find("attn_k") != std::string::npos)
        W = lora::gguf::rope_permute_rows(W, c.n_head_kv, true);
      hf[path] = W;
      lora::LoRAConfig cfg;
      cfg.rank = 4;
      cfg.alpha = 8;
      auto& layer = layers.emplace(path, lora::LoRALinear<float>(W, cfg)).first->second;
      Eigen::MatrixXf X(layer.in_features(), 16), Y(layer.out_features(), 16);
      for (Eigen::Index i = 0; i < X.size(); ++i) X.data()[i] = normal(rng);
      for (Eigen::Index i = 0; i < Y.size(); ++i) Y.data()[i] = normal(rng);
      lora::AdamWOptions opt;
      opt.lr = 0.05;
      lora::AdamW<float> adam(layer.parameters(), opt);
      for (int step = 0; step < 15; ++step) {
        layer.zero_grad();
        layer.backward(X, (2.0f / 16.0f) * (layer.forward(X) - Y));
        adam.step();
      }
    }
    std::map<std::string, const lora::LoRALinear<float>*> pointers;
    for (const auto& [path, l] : layers) pointers.emplace(path, &l);
    lora::peft::save_adapter(peft_dir, pointers);
  }

  // The merged model as llama.cpp's converter would produce it from the merged HF model: merge in
  // the HF layout, then permute q and k.
  std::string merged_base() const {
    std::map<std::string, Eigen::MatrixXf> replaced;
    for (const auto& [path, l] : layers) {
      const Eigen::MatrixXf W =
          (hf.at(path).cast<double>() +
           static_cast<double>(l.scaling()) * l.B().cast<double>() * l.A().cast<double>())
              .cast<float>();
      const std::string tensor = *lora::gguf::peft_to_gguf_name(path);
      if (tensor.find("attn_q") != std::string::npos)
        replaced[tensor] = lora::gguf::rope_permute_rows(W, model.config.n_head);
      else if (tensor.find("attn_k") != std::string::npos)
        replaced[tensor] = lora::gguf::rope_permute_rows(W, model.config.n_head_kv);
      else
        replaced[tensor] = W;
    }
    const std::string path = gguf_test::tmp_path("convert_merged.gguf");
    tiny_llama::writer(model, GgmlType::F32, replaced).save(path);
    return path;
  }
};

int run(const std::string& args) {
  const std::string command = std::string(LORA_CONVERT_EXE) + " " + args + " 2>" +
                              gguf_test::tmp_path("convert_stderr.txt");
  return std::system(command.c_str());
}

std::string last_stderr() {
  const auto b = gguf_test::read_bytes(gguf_test::tmp_path("convert_stderr.txt"));
  return std::string(b.begin(), b.end());
}

TEST(GgufConvert, PeftToGgufIsTheMergedModelInLlamaCpp) {
  const Fixture f;
  const std::string out = gguf_test::tmp_path("converted.gguf");
  ASSERT_EQ(run("peft-to-gguf " + f.peft_dir + " " + f.base_path + " " + out), 0) << last_stderr();
  llama_cpp::Model base(f.base_path);
  llama_cpp::Adapter adapter(base, out);
  const Eigen::MatrixXd with = base.log_probs(tiny_llama::prompt(), {{&adapter, 1.0f}});
  const Eigen::MatrixXd merged = llama_cpp::Model(f.merged_base()).log_probs(tiny_llama::prompt());
  const Eigen::MatrixXd bare = base.log_probs(tiny_llama::prompt());
  EXPECT_LE((with - merged).cwiseAbs().maxCoeff(), 1e-4);
  EXPECT_GE((with - bare).cwiseAbs().maxCoeff(), 1e-2);

  // The negative control: the same adapter converted without the permutation of B (a naive
  // converter) is NOT the merged model: the comparison above fails for it.
  lora::gguf::AdapterFile<float> naive = lora::gguf::read_adapter<float>(out);
  for (auto& [tensor, a] : naive.modules) {
    if (tensor.find("attn_q") != std::string::npos)
      a.set_weights(a.A(), lora::gguf::rope_permute_rows(a.B(), f.model.config.n_head, true));
    if (tensor.find("attn_k") != std::string::npos)
      a.set_weights(a.A(), lora::gguf::rope_permute_rows(a.B(), f.model.config.n_head_kv, true));
  }
  std::map<std::string, const lora::LoRAAdapter<float>*> pointers;
  for (const auto& [tensor, a] : naive.modules) pointers.emplace(tensor, &a);
  const std::string naive_path = gguf_test::tmp_path("converted_naive.gguf");
  lora::gguf::SaveOptions o;
  o.architecture = "llama";
  lora::gguf::write_adapter<float>(naive_path, pointers, o);
  llama_cpp::Adapter naive_adapter(base, naive_path);
  const Eigen::MatrixXd wrong = base.log_probs(tiny_llama::prompt(), {{&naive_adapter, 1.0f}});
  const double naive_error = (wrong - merged).cwiseAbs().maxCoeff();
  std::printf("unpermuted B: |llama.cpp - merged| = %.3g (permuted: %.3g)\n", naive_error,
              (with - merged).cwiseAbs().maxCoeff());
  EXPECT_GT(naive_error, 1e-2);
}

TEST(GgufConvert, GgufToPeftGivesThePeftTensorsBack) {
  const Fixture f;
  const std::string gguf = gguf_test::tmp_path("roundtrip.gguf");
  const std::string back = gguf_test::tmp_path("roundtrip_peft");
  ASSERT_EQ(run("peft-to-gguf " + f.peft_dir + " " + f.base_path + " " + gguf), 0) << last_stderr();
  ASSERT_EQ(run("gguf-to-peft " + gguf + " " + f.base_path + " " + back), 0) << last_stderr();
  const auto original = lora::peft::read_adapter<float>(f.peft_dir);
  const auto returned = lora::peft::read_adapter<float>(back);
  ASSERT_EQ(returned.modules.size(), original.modules.size());
  for (const auto& [path, a] : original.modules) {
    const auto& b = returned.modules.at(path);
    EXPECT_EQ(b.A(), a.A()) << path;
    EXPECT_EQ(b.B(), a.B()) << path;
    EXPECT_FLOAT_EQ(b.scaling(), a.scaling()) << path;
  }
  EXPECT_EQ(returned.config.r, original.config.r);
  EXPECT_EQ(returned.config.lora_alpha, original.config.lora_alpha);
}

TEST(GgufConvert, ProgramRefusesWithOneLineAndStatus1) {
  const Fixture f;
  EXPECT_EQ(run("--help > /dev/null"), 0);
  EXPECT_NE(run(""), 0);
  EXPECT_NE(run("peft-to-gguf " + f.peft_dir), 0);
  EXPECT_NE(last_stderr().find("takes 3 arguments"), std::string::npos) << last_stderr();
  const std::string out = gguf_test::tmp_path("refused.gguf");
  EXPECT_NE(run("peft-to-gguf " + f.peft_dir + " " + f.base_path + " " + out + " --outtype q4_0"),
            0);
  EXPECT_NE(last_stderr().find("unknown --outtype"), std::string::npos) << last_stderr();
  // q8_0 with rank 4: refused, saying why, nothing written.
  EXPECT_NE(run("peft-to-gguf " + f.peft_dir + " " + f.base_path + " " + out + " --outtype q8_0"),
            0);
  EXPECT_NE(last_stderr().find("multiples of 32"), std::string::npos) << last_stderr();
  // A base of another shape: the PEFT adapter does not fit it.
  tiny_llama::Config other;
  other.n_ff = 96;
  const std::string other_base = gguf_test::tmp_path("convert_other_base.gguf");
  tiny_llama::writer(tiny_llama::make(3, other)).save(other_base);
  EXPECT_NE(run("peft-to-gguf " + f.peft_dir + " " + other_base + " " + out), 0);
  EXPECT_NE(last_stderr().find("ffn_down"), std::string::npos) << last_stderr();
  const std::string err = last_stderr();
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
}

}  // namespace test_gguf_convert
