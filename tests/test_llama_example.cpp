// llama.cpp judges the llama example (examples/llama): the base.gguf and adapter.gguf that
// `llama_finetune --demo --quick` wrote (ctest example_llama_finetune, this test's fixture) are
// loaded into llama.cpp's own library, whose next-token log-probabilities, greedy continuation and
// held-out perplexity are compared with the example's forward on the same files. With
// LORA_LLAMA_DEMO_DIR set, the files of another run are judged instead, e.g. the full demo's:
//   LORA_LLAMA_DEMO_DIR=build/llama_demo build/tests/test_llama_example
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "llama/llama_gguf.hpp"
#include "llama/text_data.hpp"
#include "llama/train.hpp"
#include "llama_cpp_client.hpp"

namespace test_llama_example {

const std::string kDir =
    std::getenv("LORA_LLAMA_DEMO_DIR") ? std::getenv("LORA_LLAMA_DEMO_DIR") : LORA_LLAMA_QUICK_DIR;

// The example's log-probabilities after each token (n_vocab x n), in double.
Eigen::MatrixXd example_log_probs(llama::Model<float>& model, const std::vector<int>& tokens) {
  const Eigen::MatrixXd logits =
      model.forward(tokens, static_cast<int>(tokens.size())).cast<double>();
  Eigen::MatrixXd out(logits.rows(), logits.cols());
  for (Eigen::Index j = 0; j < logits.cols(); ++j) {
    double m = logits(0, j);
    for (Eigen::Index i = 1; i < logits.rows(); ++i) m = std::max(m, logits(i, j));
    double z = 0;
    for (Eigen::Index i = 0; i < logits.rows(); ++i) z += std::exp(logits(i, j) - m);
    for (Eigen::Index i = 0; i < logits.rows(); ++i) out(i, j) = logits(i, j) - m - std::log(z);
  }
  return out;
}

std::vector<llama_token> to_llama(const std::vector<int>& t) {
  return {t.begin(), t.end()};
}

// Held-out sequences of both kinds of text (byte tokens), fixed here.
std::vector<std::vector<int>> sequences() {
  return {llama::bytes_to_tokens("The LORD is my shepherd; I shall not want. He maketh me to lie "
                                 "down in green pastures"),
          llama::bytes_to_tokens("And it came to pass, when the king heard the words of the law, "
                                 "that he rent his clothes."),
          llama::bytes_to_tokens("A soft answer turneth away wrath")};
}

TEST(LlamaExample, BaseAgreesWithLlamaCpp) {
  auto ours = llama::read_model_gguf(kDir + "/base.gguf");
  llama_cpp::Model theirs(kDir + "/base.gguf");
  ASSERT_EQ(theirs.n_vocab(), ours.config().n_vocab);
  for (const auto& seq : sequences()) {
    const Eigen::MatrixXd a = example_log_probs(ours, seq);
    const Eigen::MatrixXd b = theirs.log_probs(to_llama(seq));
    const double diff = (a - b).cwiseAbs().maxCoeff();
    EXPECT_LE(diff, 1e-3);
    RecordProperty("max_abs_log_prob_difference", std::to_string(diff));
    std::printf("base: max |log p (example) - log p (llama.cpp)| = %.3g\n", diff);
  }
}

TEST(LlamaExample, AdapterAgreesWithLlamaCpp) {
  auto ours = llama::read_model_gguf(kDir + "/base.gguf");
  llama::apply_adapter_gguf(ours, kDir + "/adapter.gguf");
  auto base = llama::read_model_gguf(kDir + "/base.gguf");
  llama_cpp::Model theirs(kDir + "/base.gguf");
  llama_cpp::Adapter adapter(theirs, kDir + "/adapter.gguf");
  double moved = 0;
  for (const auto& seq : sequences()) {
    const Eigen::MatrixXd a = example_log_probs(ours, seq);
    const Eigen::MatrixXd b = theirs.log_probs(to_llama(seq), {{&adapter, 1.0f}});
    const double diff = (a - b).cwiseAbs().maxCoeff();
    EXPECT_LE(diff, 1e-3);
    std::printf("adapter: max |log p (example) - log p (llama.cpp)| = %.3g\n", diff);
    moved = std::max(moved, (a - example_log_probs(base, seq)).cwiseAbs().maxCoeff());
  }
  EXPECT_GE(moved, 1e-2) << "the adapter should change the model's predictions";
}

TEST(LlamaExample, GreedyContinuationIsLlamaCpps) {
  auto ours = llama::read_model_gguf(kDir + "/base.gguf");
  llama::apply_adapter_gguf(ours, kDir + "/adapter.gguf");
  llama_cpp::Model theirs(kDir + "/base.gguf");
  llama_cpp::Adapter adapter(theirs, kDir + "/adapter.gguf");
  const std::vector<int> prompt = llama::bytes_to_tokens("And the LORD said");
  const std::vector<int> example = llama::generate_greedy(ours, prompt, 24);
  std::vector<llama_token> tokens = to_llama(prompt);
  for (int i = 0; i < 24; ++i) {
    const Eigen::MatrixXd lp = theirs.log_probs(tokens, {{&adapter, 1.0f}});
    Eigen::Index best = 0;
    for (Eigen::Index v = 1; v < lp.rows(); ++v)
      if (lp(v, lp.cols() - 1) > lp(best, lp.cols() - 1)) best = v;
    tokens.push_back(static_cast<llama_token>(best));
  }
  EXPECT_EQ(std::vector<int>(tokens.begin(), tokens.end()), example)
      << "llama.cpp: \"" << llama::tokens_to_bytes({tokens.begin(), tokens.end()})
      << "\"\nexample:   \"" << llama::tokens_to_bytes(example) << "\"";
}

// The demo's report says how much the adapter lowers the held-out poetry's perplexity; llama.cpp,
// on the same windows and files, must find the same drop.
TEST(LlamaExample, PerplexityDropIsTheOneLlamaCppMeasures) {
  std::ifstream in(kDir + "/llama_demo.json");
  ASSERT_TRUE(in) << "run llama_finetune --demo --quick --out " << kDir << " first";
  const auto report = nlohmann::json::parse(in);
  const double reported =
      report["adapter_poetry_ppl"].get<double>() / report["base_poetry_ppl"].get<double>();
  const int L = report["eval_windows"]["seq_len"].get<int>();
  const int count = report["eval_windows"]["count"].get<int>();
  const auto windows = llama::eval_windows(llama::poetry_corpus().held_out, L, count);
  llama_cpp::Model theirs(kDir + "/base.gguf");
  llama_cpp::Adapter adapter(theirs, kDir + "/adapter.gguf");
  auto ppl = [&](bool with_adapter) {
    double nll = 0;
    long n = 0;
    for (const auto& w : windows) {
      const Eigen::MatrixXd lp = with_adapter ? theirs.log_probs(to_llama(w), {{&adapter, 1.0f}})
                                              : theirs.log_probs(to_llama(w));
      for (std::size_t j = 0; j + 1 < w.size(); ++j, ++n)
        nll -= lp(w[j + 1], static_cast<Eigen::Index>(j));
    }
    return std::exp(nll / static_cast<double>(n));
  };
  const double measured = ppl(true) / ppl(false);
  std::printf(
      "poetry perplexity with / without the adapter: llama.cpp %.6f, the example's report %.6f\n",
      measured, reported);
  EXPECT_LT(measured, 1.0) << "the adapter should lower the poetry's perplexity";
  EXPECT_NEAR(measured, reported, 1e-3 * reported);
}

}  // namespace test_llama_example
