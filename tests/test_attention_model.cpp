// The attention example's model (examples/attention/attention_model.hpp): its forward against a
// plain per-token loop, and every gradient it computes by hand (softmax attention backward, LoRA
// A and B of each projection, dense projections, embeddings, head) against central finite
// differences of the loss, in double.
#include "attention/attention_model.hpp"
#include "test_helpers.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace test_attention_model {
namespace {

using attention::AttentionModel;
using attention::Batch;
using attention::ModelConfig;
using attention::Pooling;
using attention::Which;
using Matrix = Eigen::MatrixXd;
using Vector = Eigen::VectorXd;

ModelConfig small_config(Pooling pooling) {
  ModelConfig c;
  c.vocab = 7;
  c.seq_len = 5;
  c.d_model = 8;
  c.heads = 2;
  c.layers = 2;
  c.classes = 3;
  c.pooling = pooling;
  return c;
}

Batch random_batch(const ModelConfig& c, int n, lora::Rng& rng) {
  Batch b;
  for (int i = 0; i < n * c.seq_len; ++i)
    b.tokens.push_back(static_cast<int>(rng.next() % static_cast<std::uint64_t>(c.vocab)));
  for (int i = 0; i < n; ++i)
    b.labels.push_back(static_cast<int>(rng.next() % static_cast<std::uint64_t>(c.classes)));
  return b;
}

// Model with every kind of projection: block 0 has LoRA on Wq, Wv, Wo and a dense trainable Wk;
// block 1 has LoRA on all four. B is set to random values so that dA is not trivially zero.
AttentionModel<double> mixed_model(const ModelConfig& c, lora::Rng& rng) {
  AttentionModel<double> m(c, rng);
  lora::LoRAConfig lc;
  lc.rank = 2;
  lc.alpha = 3;
  lc.seed = 11;
  for (int l = 0; l < c.layers; ++l)
    for (Which w : {Which::Q, Which::K, Which::V, Which::O}) {
      if (l == 0 && w == Which::K) continue;
      m.block(l)[w].adapt(lc);
      lora::fill_normal(m.block(l)[w].lora().B(), rng, 0.0, 0.5);
    }
  return m;
}

class AttentionGradients : public ::testing::TestWithParam<Pooling> {};

TEST_P(AttentionGradients, EveryGradientMatchesFiniteDifferences) {
  const ModelConfig c = small_config(GetParam());
  lora::Rng rng(5);
  AttentionModel<double> m = mixed_model(c, rng);
  const Batch batch = random_batch(c, 4, rng);
  auto f = [&] {
    m.forward(batch);
    return m.loss(batch);
  };

  m.zero_grad();
  m.loss_and_backward(batch);
  const Matrix gE = m.grad_token_embedding(), gP = m.grad_position_embedding();
  const Matrix gH = m.grad_head_weight();
  const Vector gb = m.grad_head_bias();
  const double tol = 1e-6;
  EXPECT_MATRIX_NEAR(gE, lora::test::numeric_gradient(m.token_embedding(), f), tol);
  EXPECT_MATRIX_NEAR(gP, lora::test::numeric_gradient(m.position_embedding(), f), tol);
  EXPECT_MATRIX_NEAR(gH, lora::test::numeric_gradient(m.head_weight(), f), tol);
  EXPECT_MATRIX_NEAR(Matrix(gb), lora::test::numeric_gradient(m.head_bias(), f), tol);
  for (int l = 0; l < c.layers; ++l)
    for (Which w : {Which::Q, Which::K, Which::V, Which::O}) {
      SCOPED_TRACE(::testing::Message() << "block " << l << " " << attention::name(w));
      auto& p = m.block(l)[w];
      if (p.adapted()) {
        const Matrix gA = p.lora().grad_A(), gB = p.lora().grad_B();
        EXPECT_GT(gA.norm(), 0.0);
        EXPECT_GT(gB.norm(), 0.0);
        EXPECT_MATRIX_NEAR(gA, lora::test::numeric_gradient(p.lora().A(), f), tol);
        EXPECT_MATRIX_NEAR(gB, lora::test::numeric_gradient(p.lora().B(), f), tol);
      } else {
        const Matrix gW = p.dense_grad();
        EXPECT_GT(gW.norm(), 0.0);
        EXPECT_MATRIX_NEAR(gW, lora::test::numeric_gradient(p.dense_weight(), f), tol);
      }
    }
}

INSTANTIATE_TEST_SUITE_P(Pooling, AttentionGradients,
                         ::testing::Values(Pooling::First, Pooling::Mean));

// With embeddings frozen, block 0 uses backward_without_input_grad; its adapter gradients must be
// the same, and nothing frozen may collect a gradient.
TEST(AttentionGradients, FrozenEmbeddingsAndHeadCollectNothing) {
  const ModelConfig c = small_config(Pooling::First);
  lora::Rng rng(9);
  AttentionModel<double> m = mixed_model(c, rng);
  const Batch batch = random_batch(c, 3, rng);
  m.zero_grad();
  m.loss_and_backward(batch);
  const Matrix gA_full = m.block(0)[Which::Q].lora().grad_A();
  const Matrix gB_full = m.block(0)[Which::V].lora().grad_B();

  m.set_embeddings_trainable(false);
  m.set_head_trainable(false);
  m.block(0)[Which::K].set_trainable(false);
  m.zero_grad();
  m.loss_and_backward(batch);
  EXPECT_MATRIX_NEAR(m.block(0)[Which::Q].lora().grad_A(), gA_full, 1e-12);
  EXPECT_MATRIX_NEAR(m.block(0)[Which::V].lora().grad_B(), gB_full, 1e-12);
  EXPECT_EQ(m.grad_token_embedding().norm(), 0.0);
  EXPECT_EQ(m.grad_position_embedding().norm(), 0.0);
  EXPECT_EQ(m.grad_head_weight().norm(), 0.0);
  EXPECT_EQ(m.block(0)[Which::K].dense_grad().norm(), 0.0);
  // 7 LoRA layers of rank 2 on 8 x 8 weights: 7 * 2 * (8 + 8), as views for an optimizer too.
  EXPECT_EQ(m.trainable_parameter_count(), 7 * 2 * 16);
  EXPECT_EQ(m.trainable_parameters().size(), 14u);
  EXPECT_EQ(lora::parameter_count(m.trainable_parameters()), 7 * 2 * 16);
}

// The forward against a direct per-token computation with explicit loops.
TEST(AttentionForward, MatchesPlainLoops) {
  for (Pooling pooling : {Pooling::First, Pooling::Mean}) {
    const ModelConfig c = small_config(pooling);
    lora::Rng rng(3);
    AttentionModel<double> m = mixed_model(c, rng);
    const Batch batch = random_batch(c, 3, rng);
    const Matrix logits = m.forward(batch);

    const int L = c.seq_len, d = c.d_model, dh = d / c.heads;
    auto weight = [&](int l, Which w) -> Matrix {
      const auto& p = m.block(l)[w];
      if (!p.adapted()) return p.weight();
      return p.weight() + p.lora().scaling() * p.lora().B() * p.lora().A();  // dense W0 + s B A
    };
    for (int s = 0; s < batch.size(); ++s) {
      std::vector<Vector> x(L);
      for (int t = 0; t < L; ++t)
        x[t] = m.token_embedding().col(batch.tokens[s * L + t]) + m.position_embedding().col(t);
      for (int l = 0; l < c.layers; ++l) {
        const Matrix Wq = weight(l, Which::Q), Wk = weight(l, Which::K);
        const Matrix Wv = weight(l, Which::V), Wo = weight(l, Which::O);
        std::vector<Vector> y(L);
        for (int i = 0; i < L; ++i) {
          Vector ctx = Vector::Zero(d);
          const Vector q = Wq * x[i];
          for (int h = 0; h < c.heads; ++h) {
            std::vector<double> score(L);
            double mx = -1e300, z = 0;
            for (int j = 0; j < L; ++j) {
              const Vector k = Wk * x[j];
              score[j] = q.segment(h * dh, dh).dot(k.segment(h * dh, dh)) / std::sqrt(dh);
              mx = std::max(mx, score[j]);
            }
            for (int j = 0; j < L; ++j) z += std::exp(score[j] - mx);
            for (int j = 0; j < L; ++j)
              ctx.segment(h * dh, dh) +=
                  std::exp(score[j] - mx) / z * (Wv * x[j]).segment(h * dh, dh);
          }
          y[i] = x[i] + Wo * ctx;
        }
        x = y;
      }
      Vector pooled = x[0];
      if (pooling == Pooling::Mean) {
        for (int t = 1; t < L; ++t) pooled += x[t];
        pooled /= L;
      }
      const Vector expected = m.head_weight() * pooled + m.head_bias();
      EXPECT_MATRIX_NEAR(Matrix(logits.col(s)), Matrix(expected), 1e-12);
    }
  }
}

// A fresh adapter (B = 0) leaves the model's output unchanged, so adapting starts from the base.
TEST(AttentionForward, FreshAdaptersKeepTheBaseOutput) {
  const ModelConfig c = small_config(Pooling::First);
  lora::Rng rng(4);
  AttentionModel<double> base(c, rng);
  const Batch batch = random_batch(c, 5, rng);
  const Matrix before = base.forward(batch);
  AttentionModel<double> adapted = base;
  lora::LoRAConfig lc;
  lc.rank = 3;
  adapted.adapt({Which::Q, Which::K, Which::V, Which::O}, lc);
  EXPECT_MATRIX_NEAR(adapted.forward(batch), before, 1e-14);
  EXPECT_EQ(adapted.trainable_parameter_count(), 2 * 4 * 3 * (8 + 8));
}

TEST(AttentionForward, RejectsBadInput) {
  const ModelConfig c = small_config(Pooling::First);
  lora::Rng rng(1);
  AttentionModel<double> m(c, rng);
  Batch b = random_batch(c, 2, rng);
  b.tokens.pop_back();
  EXPECT_THROW(m.forward(b), std::invalid_argument);
  b = random_batch(c, 2, rng);
  b.tokens[3] = c.vocab;
  EXPECT_THROW(m.forward(b), std::invalid_argument);
  b = random_batch(c, 2, rng);
  b.labels[1] = c.classes;
  m.forward(b);
  EXPECT_THROW(m.loss(b), std::invalid_argument);
  ModelConfig bad = c;
  bad.heads = 3;  // 8 is not a multiple of 3
  EXPECT_THROW(AttentionModel<double>(bad, rng), std::invalid_argument);
}

}  // namespace
}  // namespace test_attention_model
