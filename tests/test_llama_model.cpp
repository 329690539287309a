// The llama example's model (examples/llama/llama_model.hpp): its hand-written backward against
// central finite differences of its loss, for every kind of parameter (so every block's backward:
// RMSNorm, rotary embedding, grouped-query causal attention, SwiGLU, the embedding and the output),
// in pretraining mode (everything trains) and with LoRA on all seven projections; and the forward
// against a plain per-token computation written independently here.
#include <gtest/gtest.h>

#include <lora/core.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "llama/llama_model.hpp"

namespace test_llama_model {

using Matrix = Eigen::MatrixXd;
using Model = llama::Model<double>;

llama::Config tiny_config() {
  llama::Config c;
  c.n_vocab = 11;
  c.n_embd = 8;
  c.n_layer = 2;
  c.n_head = 4;
  c.n_head_kv = 2;  // grouped-query
  c.n_ff = 12;
  c.n_ctx = 8;
  c.rms_eps = 1e-5f;
  c.rope_base = 100.0f;  // large angles at small positions: a wrong rotation shows
  return c;
}

const std::vector<int> kTokens = {1, 5, 3, 9, 10, 2, 7, 7, 0, 4};  // 2 sequences of 5

double loss_of(Model& m) {
  m.forward(kTokens, 5);
  return m.loss_and_grad();
}

// Every element of every trainable tensor (a sample of them for large ones) against central
// differences of the loss.
void expect_gradients_match_finite_differences(Model& model) {
  model.zero_grad();
  loss_of(model);
  model.backward();
  auto params = model.parameters();
  ASSERT_FALSE(params.empty());
  const double h = 1e-6;
  for (auto& p : params) {
    const Matrix analytic = p.grad;
    const Eigen::Index n = p.value.size();
    const Eigen::Index stride = n > 40 ? n / 40 + 1 : 1;
    double worst = 0.0;
    for (Eigen::Index i = 0; i < n; i += stride) {
      double& v = p.value.data()[i];
      const double saved = v;
      v = saved + h;
      const double up = loss_of(model);
      v = saved - h;
      const double down = loss_of(model);
      v = saved;
      const double numeric = (up - down) / (2 * h);
      const double a = analytic.data()[i];
      worst = std::max(worst, std::abs(a - numeric) / std::max(1e-4, std::abs(numeric)));
      EXPECT_NEAR(a, numeric, 1e-6 + 1e-5 * std::abs(numeric)) << p.name << "[" << i << "]";
    }
    (void)worst;
  }
}

TEST(LlamaModel, PretrainingGradientsMatchFiniteDifferences) {
  lora::Rng rng(7);
  Model model(tiny_config(), rng);
  expect_gradients_match_finite_differences(model);
}

TEST(LlamaModel, LoRAGradientsMatchFiniteDifferences) {
  lora::Rng rng(8);
  Model model(tiny_config(), rng);
  lora::LoRAConfig cfg;
  cfg.rank = 2;
  cfg.alpha = 4;
  model.adapt(cfg, {llama::Proj::Q, llama::Proj::K, llama::Proj::V, llama::Proj::O,
                    llama::Proj::Gate, llama::Proj::Up, llama::Proj::Down});
  // B = 0 after adapt(): give B values so that dA is not zero and B's paths are exercised.
  for (int l = 0; l < 2; ++l)
    for (int p = 0; p < llama::kProjections; ++p)
      lora::fill_normal(model.projection(l, static_cast<llama::Proj>(p)).layer().B(), rng, 0.0,
                        0.3);
  // Only A and B train: 2 blocks x 7 projections x 2 tensors.
  EXPECT_EQ(model.parameters().size(), 28u);
  expect_gradients_match_finite_differences(model);
}

TEST(LlamaModel, TiedOutputGradientsMatchFiniteDifferences) {
  lora::Rng rng(9);
  llama::Config c = tiny_config();
  Model random(c, rng);
  llama::Weights<double> w;
  w.token_embd = random.token_embd();
  w.output_norm = random.output_norm();
  for (int l = 0; l < c.n_layer; ++l) {
    llama::Weights<double>::Block b;
    b.attn_norm = random.attn_norm(l);
    b.ffn_norm = random.ffn_norm(l);
    for (int p = 0; p < llama::kProjections; ++p)
      b.proj[p] = random.projection(l, static_cast<llama::Proj>(p)).base_weight();
    w.blocks.push_back(b);
  }
  Model tied(c, w);  // no output weight: logits = token_embd^T n
  ASSERT_TRUE(tied.tied_output());
  expect_gradients_match_finite_differences(tied);
}

// The forward of one token written plainly, per head and per pair, from the weights alone.
Eigen::VectorXd reference_logits(Model& m, const std::vector<int>& seq, int pos) {
  const llama::Config& c = m.config();
  const int hd = c.head_dim(), group = c.n_head / c.n_head_kv;
  auto norm = [&](const Eigen::VectorXd& x, const Eigen::VectorXd& w) {
    const double ms = x.squaredNorm() / x.size();
    return Eigen::VectorXd(x.cwiseProduct(w) / std::sqrt(ms + c.rms_eps));
  };
  auto rotate = [&](Eigen::VectorXd x, int p) {
    for (int h = 0; h < x.size() / hd; ++h)
      for (int i = 0; i < hd / 2; ++i) {
        const double theta = p * std::pow(static_cast<double>(c.rope_base), -2.0 * i / hd);
        const double x0 = x(h * hd + 2 * i), x1 = x(h * hd + 2 * i + 1);
        x(h * hd + 2 * i) = x0 * std::cos(theta) - x1 * std::sin(theta);
        x(h * hd + 2 * i + 1) = x0 * std::sin(theta) + x1 * std::cos(theta);
      }
    return x;
  };
  std::vector<Eigen::VectorXd> xs;
  for (int t = 0; t <= pos; ++t) xs.push_back(m.token_embd().col(seq[static_cast<std::size_t>(t)]));
  for (int l = 0; l < c.n_layer; ++l) {
    auto W = [&](llama::Proj p) { return m.projection(l, p).base_weight(); };
    std::vector<Eigen::VectorXd> q, k, v;
    for (int t = 0; t <= pos; ++t) {
      const Eigen::VectorXd n = norm(xs[static_cast<std::size_t>(t)], m.attn_norm(l));
      q.push_back(rotate(W(llama::Proj::Q) * n, t));
      k.push_back(rotate(W(llama::Proj::K) * n, t));
      v.push_back(W(llama::Proj::V) * n);
    }
    std::vector<Eigen::VectorXd> next;
    for (int t = 0; t <= pos; ++t) {
      Eigen::VectorXd attn = Eigen::VectorXd::Zero(c.n_embd);
      for (int h = 0; h < c.n_head; ++h) {
        const int g = h / group;
        std::vector<double> e;
        double z = 0;
        for (int j = 0; j <= t; ++j) {
          e.push_back(std::exp(q[static_cast<std::size_t>(t)]
                                   .segment(h * hd, hd)
                                   .dot(k[static_cast<std::size_t>(j)].segment(g * hd, hd)) /
                               std::sqrt(static_cast<double>(hd))));
          z += e.back();
        }
        for (int j = 0; j <= t; ++j)
          attn.segment(h * hd, hd) += e[static_cast<std::size_t>(j)] / z *
                                      v[static_cast<std::size_t>(j)].segment(g * hd, hd);
      }
      Eigen::VectorXd hres = xs[static_cast<std::size_t>(t)] + W(llama::Proj::O) * attn;
      const Eigen::VectorXd mm = norm(hres, m.ffn_norm(l));
      const Eigen::VectorXd a = W(llama::Proj::Gate) * mm, u = W(llama::Proj::Up) * mm;
      Eigen::VectorXd act(a.size());
      for (Eigen::Index i = 0; i < a.size(); ++i) act(i) = a(i) / (1 + std::exp(-a(i))) * u(i);
      next.push_back(hres + W(llama::Proj::Down) * act);
    }
    xs = next;
  }
  return m.output()->base_weight() * norm(xs.back(), m.output_norm());
}

TEST(LlamaModel, ForwardMatchesPlainPerTokenComputation) {
  lora::Rng rng(10);
  Model model(tiny_config(), rng);
  const Matrix logits = model.forward(kTokens, 5);
  for (int s = 0; s < 2; ++s) {
    const std::vector<int> seq(kTokens.begin() + 5 * s, kTokens.begin() + 5 * s + 5);
    for (int pos = 0; pos < 5; ++pos) {
      const Eigen::VectorXd ref = reference_logits(model, seq, pos);
      EXPECT_LT((logits.col(5 * s + pos) - ref).norm(), 1e-10 * (1 + ref.norm()))
          << "sequence " << s << " position " << pos;
    }
  }
}

}  // namespace test_llama_model
