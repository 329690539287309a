// LoRA on a token embedding and on mixture-of-experts weights, all float, one thread unless
// OMP_NUM_THREADS says otherwise.
//
// Embedding: vocabulary 32,000 or 128,000 (the argument), dim 4096, r 16, 2,048 tokens a step.
//   BM_EmbeddingLookup     the frozen table alone (W0[ids]): the floor
//   BM_EmbeddingLowRank    the low-rank work alone on plain Eigen matrices: s B A(:, ids) and the
//                          gradients' products (B^T G, G A(:, ids)^T), the same shapes
//   BM_EmbeddingTrainStep  LoRAEmbedding forward + backward + AdamW step (lazy, on the columns of
//                          the ids) + zero_grad, after 10 untimed steps: compare with Lookup +
//                          LowRank, and 32k with 128k
// Experts: E = 8, top-2 routing, in = out = 2048, r 16, 512 tokens.
//   BM_ExpertsForward/0    the routed frozen products alone (the layer with no adapter active)
//   BM_ExpertsForward/1    the LoRA forward
//   BM_ExpertsTrainStep    forward + backward (with dX) + AdamW step + zero_grad
// (each after untimed calls that grow its workspace)
//
//   lora_embedding_experts_benchmarks [--benchmark_filter=...] [--benchmark_min_time=0.2]
#include <lora/lora_embedding.hpp>
#include <lora/lora_experts.hpp>
#include <lora/optim.hpp>
#include <lora/random.hpp>

#include <benchmark/benchmark.h>

#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <vector>

namespace {

using Matrix = Eigen::MatrixXf;
using Ids = std::vector<std::int64_t>;

constexpr int kDim = 4096, kRank = 16, kTokens = 2048;
constexpr int kExperts = 8, kTopK = 2, kExpertDim = 2048, kExpertTokens = 512;

lora::LoRAConfig config() {
  lora::LoRAConfig c;
  c.rank = kRank;
  c.alpha = 32;
  return c;
}

/// A LoRAEmbedding of `vocab` tokens (built once per size; the table is made as the storage holds
/// it, dim x vocab, so that no second copy exists) with a non-zero A.
lora::LoRAEmbedding<float>& embedding(int vocab) {
  static std::map<int, std::unique_ptr<lora::LoRAEmbedding<float>>> layers;
  auto& l = layers[vocab];
  if (!l) {
    Matrix table = Matrix::Random(kDim, vocab);
    l = std::make_unique<lora::LoRAEmbedding<float>>(
        lora::DenseFrozenWeight<float>(std::move(table)), config());
    l->A().setRandom();
  }
  return *l;
}

Ids token_ids(int vocab, std::uint32_t seed) {
  std::mt19937 gen(seed);
  Ids ids(kTokens);
  for (auto& id : ids) id = static_cast<std::int64_t>(gen() % static_cast<std::uint32_t>(vocab));
  return ids;
}

void BM_EmbeddingLookup(benchmark::State& state) {
  const int vocab = static_cast<int>(state.range(0));
  auto& l = embedding(vocab);
  const Ids ids = token_ids(vocab, 1);
  Matrix H(kDim, kTokens);
  for (auto _ : state) {
    l.frozen().gather_columns(ids, H);
    benchmark::DoNotOptimize(H.data());
  }
}

void BM_EmbeddingLowRank(benchmark::State& state) {
  const Matrix B = Matrix::Random(kDim, kRank), AX = Matrix::Random(kRank, kTokens);
  const Matrix G = Matrix::Random(kDim, kTokens);
  Matrix H = Matrix::Zero(kDim, kTokens), BtG(kRank, kTokens), dB = Matrix::Zero(kDim, kRank);
  for (auto _ : state) {
    H.noalias() += 2.0f * B * AX;        // forward: s B A(:, ids)
    BtG.noalias() = B.transpose() * G;   // backward: B^T G
    dB.noalias() += G * AX.transpose();  // dB
    benchmark::DoNotOptimize(H.data());
    benchmark::DoNotOptimize(dB.data());
  }
}

void BM_EmbeddingTrainStep(benchmark::State& state) {
  const int vocab = static_cast<int>(state.range(0));
  auto& l = embedding(vocab);
  lora::AdamW<float> opt(l.parameters());
  lora::Workspace<float> ws;
  const Ids ids = token_ids(vocab, 2);
  const Matrix G = Matrix::Random(kDim, kTokens);
  Matrix H(kDim, kTokens);
  auto step = [&] {
    l.forward(ids, H, ws);
    l.backward(ids, G, ws);
    opt.step();
    opt.zero_grad();
    benchmark::DoNotOptimize(H.data());
  };
  // The steady state: the first steps grow the workspace and touch the table's, A's and the
  // optimizer's pages at these ids for the first time (a one-time cost that a short run would
  // spread over its few timed steps, more of it the larger the vocabulary).
  for (int i = 0; i < 10; ++i) step();
  for (auto _ : state) step();
}

BENCHMARK(BM_EmbeddingLookup)->Arg(32000)->Arg(128000)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EmbeddingLowRank)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EmbeddingTrainStep)->Arg(32000)->Arg(128000)->Unit(benchmark::kMillisecond);

// ---- experts ------------------------------------------------------------------------------------

lora::LoRAExperts<float>& experts() {
  static auto* l = [] {
    std::vector<Matrix> W;
    lora::Rng rng(3);
    for (int e = 0; e < kExperts; ++e) {
      Matrix w(kExpertDim, kExpertDim);
      lora::fill_normal(w, rng, 0.0, 0.02);
      W.push_back(std::move(w));
    }
    auto* layer = new lora::LoRAExperts<float>(W, config());
    for (int e = 0; e < kExperts; ++e) layer->expert(e).adapter("default").B().setRandom();
    return layer;
  }();
  return *l;
}

lora::ExpertRouting<float> routing() {
  lora::ExpertRouting<float> r;
  r.top_k = kTopK;
  std::mt19937 gen(4);
  for (int t = 0; t < kExpertTokens; ++t) {
    const int a = static_cast<int>(gen() % kExperts);
    const int b = (a + 1 + static_cast<int>(gen() % (kExperts - 1))) % kExperts;
    r.experts.insert(r.experts.end(), {a, b});
    r.gates.insert(r.gates.end(), {0.6f, 0.4f});
  }
  return r;
}

/// Argument 0: the routed frozen products alone (no adapter active); 1: the LoRA forward.
void BM_ExpertsForward(benchmark::State& state) {
  auto& l = experts();
  if (state.range(0) == 0) {
    l.disable();
  } else {
    l.set_active("default");
  }
  const auto r = routing();
  const Matrix X = Matrix::Random(kExpertDim, kExpertTokens);
  Matrix H(kExpertDim, kExpertTokens);
  lora::Workspace<float> ws;
  l.forward(X, r, H, ws);  // untimed: grows the workspace
  for (auto _ : state) {
    l.forward(X, r, H, ws);
    benchmark::DoNotOptimize(H.data());
  }
  l.set_active("default");
}

void BM_ExpertsTrainStep(benchmark::State& state) {
  auto& l = experts();
  l.set_active("default");
  lora::AdamW<float> opt(l.parameters());
  const auto r = routing();
  const Matrix X = Matrix::Random(kExpertDim, kExpertTokens);
  const Matrix G = Matrix::Random(kExpertDim, kExpertTokens);
  Matrix H(kExpertDim, kExpertTokens), dX(kExpertDim, kExpertTokens);
  lora::Workspace<float> ws;
  auto step = [&] {
    l.forward(X, r, H, ws);
    l.backward(X, r, G, dX, ws);
    opt.step();
    opt.zero_grad();
    benchmark::DoNotOptimize(dX.data());
  };
  step();  // untimed: grows the workspace
  for (auto _ : state) step();
}

BENCHMARK(BM_ExpertsForward)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ExpertsTrainStep)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
