// LoRAEmbedding and LoRAExperts: PEFT's numbers (tests/fixtures/peft-inits), dense references
// (one-hot inputs for the embedding, a LoRALinear per expert), finite differences, the merge
// guarantee on the dense and the bf16 storage, the lazy optimizer step on A's columns, the tied
// output head, and the allocation-free steady state.
#include "alloc_counter.hpp"
#include "test_helpers.hpp"

#include <lora/bf16_frozen_weight.hpp>
#include <lora/lora_embedding.hpp>
#include <lora/lora_experts.hpp>
#include <lora/lora_linear.hpp>
#include <lora/optim.hpp>
#include <lora/peft/embedding_experts_io.hpp>
#include <lora/summary.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <vector>

namespace test_embedding_experts {

using Eigen::MatrixXd;
using Eigen::MatrixXf;
using lora::test::fixture_path;
using Ids = std::vector<std::int64_t>;

/// An I64 tensor of the safetensors file `file` (the reader converts floats only): its bytes
/// start after the 8-byte header length and the header.
std::vector<std::int64_t> int64_tensor(const std::string& file, const std::string& name) {
  const auto st = lora::io::SafeTensors::load(fixture_path(file));
  const auto bytes = lora::test::read_bytes(fixture_path(file));
  std::uint64_t header = 0;
  std::memcpy(&header, bytes.data(), sizeof header);
  const auto& info = st.info(name);
  std::vector<std::int64_t> out(static_cast<std::size_t>(info.numel()));
  std::memcpy(out.data(), bytes.data() + 8 + header + info.begin,
              out.size() * sizeof(std::int64_t));
  return out;
}

/// A 3-D row-major tensor E x a x b as E matrices a x b.
std::vector<MatrixXd> tensor3(const lora::io::SafeTensors& st, const std::string& name) {
  const auto& shape = st.info(name).shape;
  const auto v = st.values<double>(name);
  std::vector<MatrixXd> out;
  using RowMajor = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  for (std::int64_t e = 0; e < shape[0]; ++e)
    out.push_back(
        Eigen::Map<const RowMajor>(v.data() + e * shape[1] * shape[2], shape[1], shape[2]));
  return out;
}

lora::LoRAConfig config(int r, double alpha, std::uint64_t seed = 7) {
  lora::LoRAConfig c;
  c.rank = r;
  c.alpha = alpha;
  c.seed = seed;
  return c;
}

/// The one-hot matrix of ids (k x n).
MatrixXd one_hot(const Ids& ids, Eigen::Index k) {
  MatrixXd X = MatrixXd::Zero(k, static_cast<Eigen::Index>(ids.size()));
  for (std::size_t j = 0; j < ids.size(); ++j) X(ids[j], static_cast<Eigen::Index>(j)) = 1;
  return X;
}

// ---- embedding
// ------------------------------------------------------------------------------------

TEST(LoRAEmbedding, MatchesPeftOnItsOwnNumbers) {
  const auto st = lora::io::SafeTensors::load(fixture_path("peft-inits/embedding_f64.safetensors"));
  const MatrixXd W0 = st.matrix<double>("W0");
  const Ids ids = int64_tensor("peft-inits/embedding_f64.safetensors", "ids");
  lora::LoRAEmbedding<double> layer(W0, config(3, 6));
  ASSERT_EQ(layer.num_embeddings(), 20);
  ASSERT_EQ(layer.embedding_dim(), 6);
  EXPECT_DOUBLE_EQ(layer.scaling(), 2.0);
  layer.A() = st.matrix<double>("A");
  layer.B() = st.matrix<double>("B");
  EXPECT_MATRIX_NEAR(layer.forward(ids), MatrixXd(st.matrix<double>("y").transpose()), 1e-14);
  layer.backward(ids, st.matrix<double>("G").transpose());
  EXPECT_MATRIX_NEAR(layer.grad_A(), st.matrix<double>("dA"), 1e-14);
  EXPECT_MATRIX_NEAR(layer.grad_B(), st.matrix<double>("dB"), 1e-14);
  // Only the columns of the ids seen carry a gradient, and they are the ones marked.
  const std::set<std::int64_t> seen(ids.begin(), ids.end());
  const auto& cols = layer.active_adapter().grad_A_columns();
  ASSERT_TRUE(cols.sparse());
  EXPECT_EQ(std::set<std::int64_t>(cols.list.begin(), cols.list.end()), seen);
  for (Eigen::Index c = 0; c < 20; ++c) {
    if (!seen.count(c)) {
      EXPECT_EQ(layer.grad_A().col(c).norm(), 0.0);
    }
  }

  const MatrixXd y = layer.forward(ids);
  layer.merge();
  EXPECT_MATRIX_NEAR(layer.weight(), st.matrix<double>("W_merged"), 1e-14);
  EXPECT_MATRIX_NEAR(layer.forward(ids), y, 1e-14);
  layer.unmerge();
  EXPECT_MATRIX_NEAR(layer.weight(), W0, 1e-15);
}

TEST(LoRAEmbedding, StartsAsPeftDoesAndEqualsTheBaseTable) {
  std::mt19937 gen(3);
  const MatrixXd W0 = MatrixXd::Random(50, 12);
  lora::LoRAEmbedding<double> layer(W0, config(4, 8));
  EXPECT_EQ(layer.A().norm(), 0.0);  // PEFT: lora_embedding_A = 0
  EXPECT_GT(layer.B().norm(), 0.0);  // lora_embedding_B ~ N(0, 1)
  EXPECT_NEAR(layer.B().mean(), 0.0, 0.5);
  EXPECT_NEAR(std::sqrt(layer.B().array().square().mean()), 1.0, 0.35);
  const Ids ids{0, 49, 7, 7};
  EXPECT_MATRIX_NEAR(layer.forward(ids), MatrixXd(W0.transpose() * one_hot(ids, 50)), 0.0);
  EXPECT_THROW(layer.forward({50}), std::invalid_argument);
  EXPECT_THROW(layer.forward({-1}), std::invalid_argument);
  lora::LoRAConfig dora = config(4, 8);
  dora.use_dora = true;
  EXPECT_THROW(lora::LoRAEmbedding<double>(W0, dora), std::invalid_argument);
  lora::LoRAConfig dropout = config(4, 8);
  dropout.dropout = 0.5;  // PEFT ignores it for embeddings: so does the layer
  lora::LoRAEmbedding<double> with_dropout(W0, dropout);
  with_dropout.A().setRandom();
  EXPECT_MATRIX_NEAR(with_dropout.forward(ids), with_dropout.forward(ids), 0.0);
}

TEST(LoRAEmbedding, MatchesTheDenseOneHotLayerAndFiniteDifferences) {
  const Eigen::Index vocab = 30, dim = 5;
  const MatrixXd W0 = MatrixXd::Random(vocab, dim);
  lora::LoRAEmbedding<double> layer(W0, config(3, 5));
  layer.A().setRandom();
  const Ids ids{4, 0, 29, 4, 11, 4};
  const MatrixXd X = one_hot(ids, vocab);
  const double s = layer.scaling();
  // The dense layer of the one-hot input: W0^T X + s B A X.
  const MatrixXd H = W0.transpose() * X + s * layer.B() * (layer.A() * X);
  EXPECT_MATRIX_NEAR(layer.forward(ids), H, 1e-14);
  const MatrixXd R = MatrixXd::Random(dim, 6);  // L = <R, H>
  layer.backward(ids, R);
  MatrixXd A = layer.A(), B = layer.B();
  auto loss = [&] { return (R.array() * (W0.transpose() * X + s * B * (A * X)).array()).sum(); };
  EXPECT_MATRIX_NEAR(layer.grad_A(), lora::test::numeric_gradient(A, loss), 1e-7);
  EXPECT_MATRIX_NEAR(layer.grad_B(), lora::test::numeric_gradient(B, loss), 1e-7);
  // zero_grad clears the marked columns only, and every gradient is zero afterwards.
  layer.zero_grad();
  EXPECT_EQ(layer.grad_A().norm(), 0.0);
  EXPECT_EQ(layer.grad_B().norm(), 0.0);
  EXPECT_TRUE(layer.active_adapter().grad_A_columns().list.empty());
}

TEST(LoRAEmbedding, TheLazyOptimizerStepTouchesOnlyColumnsWithAGradient) {
  const MatrixXd W0 = MatrixXd::Random(40, 6);
  lora::LoRAEmbedding<double> sparse(W0, config(2, 4)), dense(W0, config(2, 4));
  sparse.A().setRandom();
  dense.A() = sparse.A();
  const Ids ids{3, 9, 3};
  const MatrixXd G = MatrixXd::Random(6, 3);
  lora::AdamWOptions o;
  o.weight_decay = 0;  // the first dense step then leaves untouched columns as they are
  lora::AdamW<double> opt_s(sparse.parameters(), o), opt_d(dense.parameters(false), o);
  const MatrixXd A_before = sparse.A();
  sparse.backward(ids, G);
  dense.backward(ids, G);
  opt_s.step();
  opt_d.step();
  EXPECT_MATRIX_NEAR(sparse.A(), dense.A(), 1e-15);
  EXPECT_MATRIX_NEAR(sparse.B(), dense.B(), 1e-15);
  for (Eigen::Index c = 0; c < 40; ++c) {
    if (c != 3 && c != 9) {
      EXPECT_EQ((sparse.A().col(c) - A_before.col(c)).norm(), 0.0);
    }
  }
  // With weight decay the lazy step keeps unseen columns (dense AdamW would decay them).
  lora::AdamWOptions wd;
  wd.weight_decay = 0.5;
  lora::AdamW<double> lazy(sparse.parameters(), wd);
  opt_s.zero_grad();
  const MatrixXd A1 = sparse.A();
  sparse.backward({5}, G.leftCols(1));
  lazy.step();
  for (Eigen::Index c = 0; c < 40; ++c) {
    if (c != 5) {
      EXPECT_EQ((sparse.A().col(c) - A1.col(c)).norm(), 0.0);
    }
  }
  EXPECT_GT((sparse.A().col(5) - A1.col(5)).norm(), 0.0);
  // SGD and clipping see the same columns.
  lora::SGD<double> sgd(sparse.parameters(), {});
  const double norm = lora::clip_grad_norm(sparse.parameters(), 1e9);
  EXPECT_NEAR(norm, std::sqrt(sparse.grad_A().squaredNorm() + sparse.grad_B().squaredNorm()),
              1e-12);
}

TEST(LoRAEmbedding, ATiedOutputHeadUsesTheSameAdaptedTable) {
  const Eigen::Index vocab = 25, dim = 6, n = 4;
  const MatrixXd W0 = MatrixXd::Random(vocab, dim);
  lora::LoRAEmbedding<double> layer(W0, config(3, 6));
  layer.A().setRandom();
  const double s = layer.scaling();
  const MatrixXd table = W0 + s * (layer.B() * layer.A()).transpose();
  const MatrixXd X = MatrixXd::Random(dim, n);
  EXPECT_MATRIX_NEAR(layer.output_forward(X), MatrixXd(table * X), 1e-13);
  const MatrixXd R = MatrixXd::Random(vocab, n);  // L = <R, logits>
  lora::Workspace<double> ws;
  MatrixXd dX(dim, n);
  layer.output_backward(X, R, dX, ws);
  EXPECT_MATRIX_NEAR(dX, MatrixXd(table.transpose() * R), 1e-13);
  MatrixXd A = layer.A(), B = layer.B();
  auto loss = [&] { return (R.array() * ((W0 + s * (B * A).transpose()) * X).array()).sum(); };
  EXPECT_MATRIX_NEAR(layer.grad_A(), lora::test::numeric_gradient(A, loss), 1e-7);
  EXPECT_MATRIX_NEAR(layer.grad_B(), lora::test::numeric_gradient(B, loss), 1e-7);
  EXPECT_FALSE(layer.active_adapter().grad_A_columns().sparse());  // dense until zero_grad
  layer.zero_grad();
  EXPECT_EQ(layer.grad_A().norm(), 0.0);
  EXPECT_TRUE(layer.active_adapter().grad_A_columns().sparse());
  layer.merge();  // merged, the head and the lookup still share the adapted table
  EXPECT_MATRIX_NEAR(layer.output_forward(X), MatrixXd(table * X), 1e-13);
}

TEST(LoRAEmbedding, MergeGuaranteeOnDenseAndBf16Storages) {
  const Eigen::Index vocab = 64, dim = 16;
  const MatrixXf W0 = MatrixXf::Random(vocab, dim);
  const Ids ids{1, 63, 17, 1};
  using Bf16Layer = lora::LoRAEmbedding<float, lora::Bf16FrozenWeight>;
  lora::LoRAEmbedding<float> exact(
      lora::DenseFrozenWeight<float>(W0.transpose(), lora::MergeMode::ExactRestore), config(4, 8));
  Bf16Layer bf16(lora::Bf16FrozenWeight(W0.transpose(), lora::MergeMode::ExactRestore,
                                        lora::Bf16Backend::Portable),
                 config(4, 8));
  exact.A().setRandom();
  bf16.A() = exact.A();
  bf16.B() = exact.B();
  const MatrixXf base_bf16 = bf16.weight();  // W0 rounded to bf16
  EXPECT_LE((base_bf16 - W0).cwiseAbs().maxCoeff(), W0.cwiseAbs().maxCoeff() / 128);
  // bf16 lookup: the rounded rows plus the fp32 adapter term.
  const MatrixXf delta = exact.scaling() * exact.B() * exact.A();  // dim x vocab
  for (std::size_t j = 0; j < ids.size(); ++j)
    EXPECT_MATRIX_NEAR(bf16.forward(ids).col(j),
                       (base_bf16.row(ids[j]).transpose() + delta.col(ids[j])).eval(), 1e-6);
  for (int cycle = 0; cycle < 3; ++cycle) {
    exact.merge();
    bf16.merge();
    EXPECT_MATRIX_NEAR(exact.weight(), MatrixXf(W0 + delta.transpose()), 1e-6);
    EXPECT_MATRIX_NEAR(bf16.weight(), MatrixXf(base_bf16 + delta.transpose()), 1e-2);
    // A step while merged: a merged forward refuses, unmerge still gives W0 back bit for bit.
    exact.A()(0, 1) += 1;
    EXPECT_THROW(exact.forward(ids), std::logic_error);
    exact.unmerge();
    bf16.unmerge();
    exact.A()(0, 1) -= 1;
    EXPECT_TRUE(exact.weight() == W0);
    EXPECT_TRUE(bf16.weight() == base_bf16);
  }
  EXPECT_THROW(bf16.backward(ids, MatrixXf::Zero(dim, 3)), std::invalid_argument);
}

TEST(LoRAEmbedding, NamedAdaptersSwitchAndMerge) {
  const MatrixXd W0 = MatrixXd::Random(20, 4);
  lora::LoRAEmbedding<double> layer(W0, config(2, 4));
  layer.add_adapter("other", config(3, 3, 11));
  layer.adapter("other").A().setRandom();
  EXPECT_EQ(layer.adapter_names(), (std::vector<std::string>{"default", "other"}));
  const Ids ids{2, 19};
  const MatrixXd base = layer.forward(ids);  // "default" has A = 0
  layer.set_active("other");
  const auto& a = layer.adapter("other");
  EXPECT_MATRIX_NEAR(layer.forward(ids),
                     MatrixXd(base + a.scaling() * a.B() * (a.A() * one_hot(ids, 20))), 1e-14);
  layer.merge();
  layer.set_active("default");  // unmerges "other", merges "default"
  EXPECT_MATRIX_NEAR(layer.forward(ids), base, 1e-14);
  layer.disable();
  EXPECT_MATRIX_NEAR(layer.weight(), W0, 1e-15);
  EXPECT_EQ(layer.trainable_parameter_count(), 2 * (20 + 4) + 3 * (20 + 4));
  std::map<std::string, const lora::LoRAEmbedding<double>*> model{{"embed_tokens", &layer}};
  EXPECT_EQ(lora::summary(model).total, 20 * 4 + 2 * 24 + 3 * 24);
}

TEST(LoRAEmbedding, ASteadyTrainingStepAllocatesNothing) {
  if (!lora::test::allocation_counter_available()) GTEST_SKIP() << "no allocation counter here";
  const MatrixXf W0 = MatrixXf::Random(1000, 32);
  lora::LoRAEmbedding<float> layer(W0, config(4, 8));
  lora::AdamW<float> opt(layer.parameters());
  lora::Workspace<float> ws;
  MatrixXf H(32, 64), G = MatrixXf::Random(32, 64);
  Ids ids(64);
  std::mt19937 gen(5);
  auto step = [&] {
    for (auto& id : ids) id = static_cast<std::int64_t>(gen() % 1000);
    layer.forward(ids, H, ws);
    layer.backward(ids, G, ws);
    opt.step();
    opt.zero_grad();
  };
  step();
  step();
  const auto before = lora::test::allocation_count();
  for (int i = 0; i < 5; ++i) step();
  EXPECT_EQ(lora::test::allocation_count(), before);
}

// ---- experts
// --------------------------------------------------------------------------------------

TEST(LoRAExperts, MatchesPeftOnItsOwnNumbers) {
  const auto st = lora::io::SafeTensors::load(fixture_path("peft-inits/experts_f64.safetensors"));
  const auto W = tensor3(st, "W");  // E x in x out
  const auto delta = tensor3(st, "delta");
  const Ids route = int64_tensor("peft-inits/experts_f64.safetensors", "route");
  lora::LoRAExperts<double> layer(W, config(2, 4));
  ASSERT_EQ(layer.num_experts(), 3);
  layer.set_weights("default", st.matrix<double>("A"), st.matrix<double>("B"));
  EXPECT_MATRIX_NEAR(layer.A(), st.matrix<double>("A"), 0.0);  // PEFT's layout both ways
  EXPECT_MATRIX_NEAR(layer.B(), st.matrix<double>("B"), 0.0);
  for (Eigen::Index e = 0; e < 3; ++e)
    EXPECT_MATRIX_NEAR(layer.delta_weight(e), delta[static_cast<std::size_t>(e)], 1e-14);
  lora::ExpertRouting<double> routing;
  routing.experts.assign(route.begin(), route.end());
  const MatrixXd X = st.matrix<double>("x").transpose();
  EXPECT_MATRIX_NEAR(layer.forward(X, routing), MatrixXd(st.matrix<double>("y").transpose()),
                     1e-14);
  layer.backward(X, routing, st.matrix<double>("G").transpose());
  EXPECT_MATRIX_NEAR(layer.grad_A(), st.matrix<double>("dA"), 1e-14);
  EXPECT_MATRIX_NEAR(layer.grad_B(), st.matrix<double>("dB"), 1e-14);
  layer.merge();
  for (Eigen::Index e = 0; e < 3; ++e)
    EXPECT_MATRIX_NEAR(
        layer.weight(e),
        MatrixXd(W[static_cast<std::size_t>(e)] + delta[static_cast<std::size_t>(e)]), 1e-14);
  EXPECT_MATRIX_NEAR(layer.forward(X, routing), MatrixXd(st.matrix<double>("y").transpose()),
                     1e-14);
  layer.unmerge();
  for (Eigen::Index e = 0; e < 3; ++e)
    EXPECT_MATRIX_NEAR(layer.weight(e), W[static_cast<std::size_t>(e)], 1e-15);
}

TEST(LoRAExperts, TopTwoRoutingMatchesALoRALinearPerExpertAndFiniteDifferences) {
  const Eigen::Index E = 4, in = 7, out = 5, n = 6, K = 2;
  std::vector<MatrixXd> W;
  for (Eigen::Index e = 0; e < E; ++e) W.push_back(MatrixXd::Random(in, out));
  lora::LoRAExperts<double> layer(W, config(2, 6));
  const MatrixXd A = MatrixXd::Random(2 * E, in), B = MatrixXd::Random(out, 2 * E);
  layer.set_weights("default", A, B);
  lora::ExpertRouting<double> routing;
  routing.top_k = K;
  routing.experts = {0, 3, 3, 1, 2, 0, 3, 2, 1, 0, 3, 1};  // expert 3 serves four tokens
  routing.gates = {0.7, 0.3, 0.6, 0.4, 0.5, 0.5, 0.9, 0.1, 0.2, 0.8, 0.55, 0.45};
  // The reference: a LoRALinear per expert with PEFT's slices of A and B.
  std::vector<lora::LoRALinear<double>> ref;
  for (Eigen::Index e = 0; e < E; ++e) {
    ref.emplace_back(MatrixXd(W[static_cast<std::size_t>(e)].transpose()), config(2, 6));
    MatrixXd Be(out, 2);
    for (Eigen::Index j = 0; j < 2; ++j) Be.col(j) = B.col(j * E + e);
    ref.back().set_adapter_weights(A.middleRows(e * 2, 2), Be);
  }
  const MatrixXd X = MatrixXd::Random(in, n), R = MatrixXd::Random(out, n);
  MatrixXd H = MatrixXd::Zero(out, n), dX = MatrixXd::Zero(in, n);
  for (Eigen::Index t = 0; t < n; ++t)
    for (Eigen::Index j = 0; j < K; ++j) {
      const auto i = static_cast<std::size_t>(t * K + j);
      auto& L = ref[static_cast<std::size_t>(routing.experts[i])];
      const double g = routing.gates[i];
      H.col(t) += g * L.forward(X.col(t));
      dX.col(t) += L.backward(X.col(t), g * R.col(t));
    }
  EXPECT_MATRIX_NEAR(layer.forward(X, routing), H, 1e-14);
  EXPECT_MATRIX_NEAR(layer.backward(X, routing, R), dX, 1e-14);
  for (Eigen::Index e = 0; e < E; ++e) {
    EXPECT_MATRIX_NEAR(layer.expert(e).adapter("default").grad_A(),
                       ref[static_cast<std::size_t>(e)].grad_A(), 1e-14);
    EXPECT_MATRIX_NEAR(layer.expert(e).adapter("default").grad_B(),
                       ref[static_cast<std::size_t>(e)].grad_B(), 1e-14);
  }
  // Finite differences on PEFT's layout: L = <R, H(A, B)>.
  MatrixXd Ap = A, Bp = B;
  lora::LoRAExperts<double> probe(W, config(2, 6));
  auto loss = [&] {
    probe.set_weights("default", Ap, Bp);
    return (R.array() * probe.forward(X, routing).array()).sum();
  };
  EXPECT_MATRIX_NEAR(layer.grad_A(), lora::test::numeric_gradient(Ap, loss), 1e-7);
  EXPECT_MATRIX_NEAR(layer.grad_B(), lora::test::numeric_gradient(Bp, loss), 1e-7);
  MatrixXd Xp = X;
  auto loss_x = [&] { return (R.array() * layer.forward(Xp, routing).array()).sum(); };
  EXPECT_MATRIX_NEAR(dX, lora::test::numeric_gradient(Xp, loss_x), 1e-7);
  // Bad routings are refused.
  auto bad = routing;
  bad.experts[3] = 4;
  EXPECT_THROW(layer.forward(X, bad), std::invalid_argument);
  bad = routing;
  bad.gates.pop_back();
  EXPECT_THROW(layer.forward(X, bad), std::invalid_argument);
  lora::LoRAConfig dropout = config(2, 6);
  dropout.dropout = 0.1;
  EXPECT_THROW(lora::LoRAExperts<double>(W, dropout), std::invalid_argument);
  std::map<std::string, const lora::LoRAExperts<double>*> model{{"mlp.experts.w", &layer}};
  EXPECT_EQ(lora::summary(model).trainable, E * 2 * (in + out));
  EXPECT_EQ(lora::summary(model).total, E * 2 * (in + out) + E * in * out);
}

TEST(LoRAExperts, MergeGuaranteeOnDenseAndBf16Storages) {
  const Eigen::Index E = 3, in = 16, out = 8;
  std::vector<MatrixXf> W;
  std::vector<lora::Bf16FrozenWeight> stores;
  std::vector<lora::DenseFrozenWeight<float>> exact_stores;
  for (Eigen::Index e = 0; e < E; ++e) {
    W.push_back(MatrixXf::Random(in, out));
    stores.emplace_back(W.back().transpose(), lora::MergeMode::ExactRestore,
                        lora::Bf16Backend::Portable);
    exact_stores.emplace_back(W.back().transpose(), lora::MergeMode::ExactRestore);
  }
  lora::LoRAExperts<float, lora::Bf16FrozenWeight> bf16(std::move(stores), config(2, 4));
  lora::LoRAExperts<float> exact(std::move(exact_stores), config(2, 4));
  const MatrixXf A = MatrixXf::Random(2 * E, in), B = MatrixXf::Random(out, 2 * E);
  bf16.set_weights("default", A, B);
  exact.set_weights("default", A, B);
  std::vector<MatrixXf> base;
  for (Eigen::Index e = 0; e < E; ++e) base.push_back(bf16.weight(e));
  lora::ExpertRouting<float> routing;
  routing.experts = {0, 1, 2, 2};
  const MatrixXf X = MatrixXf::Random(in, 4);
  const MatrixXf H = exact.forward(X, routing);
  EXPECT_MATRIX_NEAR(bf16.forward(X, routing), H, 2e-2);
  for (int cycle = 0; cycle < 3; ++cycle) {
    exact.merge();
    bf16.merge();
    EXPECT_MATRIX_NEAR(exact.forward(X, routing), H, 1e-5);
    for (Eigen::Index e = 0; e < E; ++e)
      EXPECT_MATRIX_NEAR(exact.weight(e),
                         MatrixXf(W[static_cast<std::size_t>(e)] + exact.delta_weight(e)), 1e-6);
    EXPECT_THROW(exact.backward(X, routing, H), std::logic_error);  // merged: no training
    exact.unmerge();
    bf16.unmerge();
    for (Eigen::Index e = 0; e < E; ++e) {
      EXPECT_TRUE(exact.weight(e) == W[static_cast<std::size_t>(e)]);
      EXPECT_TRUE(bf16.weight(e) == base[static_cast<std::size_t>(e)]);
    }
  }
}

TEST(LoRAExperts, ASteadyTrainingStepAllocatesNothing) {
  if (!lora::test::allocation_counter_available()) GTEST_SKIP() << "no allocation counter here";
  const Eigen::Index E = 4, d = 32, n = 48;
  std::vector<MatrixXf> W;
  for (Eigen::Index e = 0; e < E; ++e) W.push_back(MatrixXf::Random(d, d));
  lora::LoRAExperts<float> layer(W, config(4, 8));
  lora::AdamW<float> opt(layer.parameters());
  lora::Workspace<float> ws;
  MatrixXf X = MatrixXf::Random(d, n), H(d, n), dX(d, n), G = MatrixXf::Random(d, n);
  lora::ExpertRouting<float> routing;
  routing.top_k = 2;
  routing.experts.resize(2 * n);
  routing.gates.assign(2 * n, 0.5f);
  std::mt19937 gen(9);
  auto step = [&] {
    for (auto& e : routing.experts) e = static_cast<int>(gen() % E);
    layer.forward(X, routing, H, ws);
    layer.backward(X, routing, G, dX, ws);
    opt.step();
    opt.zero_grad();
  };
  for (auto& e : routing.experts) e = 0;  // grow every slot to the whole batch first
  layer.forward(X, routing, H, ws);
  layer.backward(X, routing, G, dX, ws);
  step();
  const auto before = lora::test::allocation_count();
  for (int i = 0; i < 5; ++i) step();
  EXPECT_EQ(lora::test::allocation_count(), before);
}

// ---- PEFT files ---------------------------------------------------------------------------------

TEST(EmbeddingExpertsFiles, RoundTripWithPeftsKeysAndTargets) {
  const std::string dir = std::string(LORA_TEST_TMP_DIR) + "/embedding_experts_adapter";
  const MatrixXd W0 = MatrixXd::Random(30, 8);
  lora::LoRAEmbedding<double> emb(W0, config(4, 8));
  emb.A().setRandom();
  std::vector<MatrixXd> W;
  for (int e = 0; e < 3; ++e) W.push_back(MatrixXd::Random(8, 6));
  lora::LoRAExperts<double> moe(W, config(4, 8));
  moe.set_weights("default", MatrixXd::Random(12, 8), MatrixXd::Random(6, 12));
  const std::string expert_param = "model.layers.0.mlp.experts.gate_up_proj";
  lora::peft::save_embedding_experts<double>(
      dir, std::map<std::string, const lora::LoRAEmbedding<double>*>{{"model.embed_tokens", &emb}},
      std::map<std::string, const lora::LoRAExperts<double>*>{{expert_param, &moe}});

  // The keys PEFT's get_peft_model_state_dict writes: lora_embedding_A/B without ".weight";
  // the ParamWrapper's nn.Linear factors at the module owning the parameter.
  const auto st = lora::io::SafeTensors::load(dir + "/adapter_model.safetensors");
  EXPECT_EQ(st.names(), (std::vector<std::string>{
                            "base_model.model.model.embed_tokens.lora_embedding_A",
                            "base_model.model.model.embed_tokens.lora_embedding_B",
                            "base_model.model.model.layers.0.mlp.experts.lora_A.weight",
                            "base_model.model.model.layers.0.mlp.experts.lora_B.weight"}));
  EXPECT_EQ(st.info("base_model.model.model.embed_tokens.lora_embedding_A").shape,
            (std::vector<std::int64_t>{4, 30}));
  EXPECT_EQ(st.info("base_model.model.model.layers.0.mlp.experts.lora_A.weight").shape,
            (std::vector<std::int64_t>{12, 8}));
  EXPECT_MATRIX_NEAR(st.matrix<double>("base_model.model.model.layers.0.mlp.experts.lora_B.weight"),
                     moe.B(), 0.0);
  std::ifstream in(dir + "/adapter_config.json");
  const auto json = nlohmann::json::parse(in);
  EXPECT_EQ(json.at("target_modules"), nlohmann::json::array({"model.embed_tokens"}));
  EXPECT_EQ(json.at("target_parameters"), nlohmann::json::array({expert_param}));
  EXPECT_EQ(json.at("r"), 4);
  EXPECT_EQ(json.at("lora_alpha"), 8);

  lora::LoRAEmbedding<double> emb2(W0, config(2, 1));  // another rank: the file's wins
  lora::LoRAExperts<double> moe2(W, config(2, 1));
  lora::peft::load_embedding_experts<double>(
      dir, std::map<std::string, lora::LoRAEmbedding<double>*>{{"model.embed_tokens", &emb2}},
      std::map<std::string, lora::LoRAExperts<double>*>{{expert_param, &moe2}});
  EXPECT_MATRIX_NEAR(emb2.A(), emb.A(), 0.0);
  EXPECT_MATRIX_NEAR(emb2.B(), emb.B(), 0.0);
  EXPECT_DOUBLE_EQ(emb2.scaling(), emb.scaling());
  EXPECT_TRUE(emb2.active_adapter().grad_A_columns().sparse());
  EXPECT_MATRIX_NEAR(moe2.A(), moe.A(), 0.0);
  EXPECT_MATRIX_NEAR(moe2.B(), moe.B(), 0.0);
  const Ids ids{0, 29, 5};
  EXPECT_MATRIX_NEAR(emb2.forward(ids), emb.forward(ids), 0.0);
  lora::ExpertRouting<double> routing;
  routing.experts = {2, 0};
  const MatrixXd X = MatrixXd::Random(8, 2);
  EXPECT_MATRIX_NEAR(moe2.forward(X, routing), moe.forward(X, routing), 0.0);

  // A layer the file does not hold, or a vocabulary of another size, is refused untouched.
  lora::LoRAEmbedding<double> small(MatrixXd::Random(29, 8), config(4, 8));
  const MatrixXd A_small = small.A();
  EXPECT_THROW(
      lora::peft::load_embedding_experts<double>(
          dir, std::map<std::string, lora::LoRAEmbedding<double>*>{{"model.embed_tokens", &small}},
          std::map<std::string, lora::LoRAExperts<double>*>{{expert_param, &moe2}}),
      lora::io::FormatError);
  EXPECT_TRUE(small.A() == A_small);
  EXPECT_THROW(
      lora::peft::load_embedding_experts<double>(
          dir, std::map<std::string, lora::LoRAEmbedding<double>*>{{"model.embed_tokens", &emb2}},
          std::map<std::string, lora::LoRAExperts<double>*>{}),
      lora::io::FormatError);  // the experts' tensors would be left unread
}

}  // namespace test_embedding_experts
