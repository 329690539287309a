// One LoRA fine-tuning step of the llama example's model (examples/llama): forward, loss, backward
// (dX through every block), gradient clipping and AdamW, with r = 8 on all seven projections of
// every block, on an fp32, bf16 or NF4 frozen base. The model: n_embd 512, 8 blocks, 8 heads (2
// key/value heads), n_ff 1376, a 259-token byte vocabulary; a step is 4 sequences of 256 tokens.
// benchmarks/compare_pytorch.py's `llama` mode runs the same model and step in PyTorch.
//
//   OMP_NUM_THREADS=2 llama_benchmarks [--benchmark_filter=BM_LlamaTrainStep]
//
// Counters: tokens_per_s; base_bytes (the frozen projections as stored); peak_rss_mb (the process's
// peak resident memory so far: run one family per process to read it for that family).
#include <lora/bf16_frozen_weight.hpp>
#include <lora/core.hpp>
#include <lora/nf4_frozen_weight.hpp>

#include <sys/resource.h>

#include <benchmark/benchmark.h>

#include <vector>

#include "llama/llama_model.hpp"
#include "llama/text_data.hpp"
#include "llama/train.hpp"

namespace {

llama::Config bench_config() {
  llama::Config c;
  c.n_vocab = llama::kByteVocab;
  c.n_embd = 512;
  c.n_layer = 8;
  c.n_head = 8;
  c.n_head_kv = 2;
  c.n_ff = 1376;
  c.n_ctx = 256;
  return c;
}
constexpr int kSeqLen = 256, kBatch = 4, kRank = 8;

double peak_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;  // kilobytes on Linux
}

template <typename Frozen>
void BM_LlamaTrainStepOn(benchmark::State& state) {
  llama::keep_freed_memory();  // as llama_finetune does (examples/llama/train.hpp)
  const llama::Config cfg = bench_config();
  lora::Rng rng(1);
  llama::Model<float, Frozen> model(cfg, rng);
  lora::LoRAConfig lc;
  lc.rank = kRank;
  lc.alpha = 16;
  model.adapt(lc, {llama::Proj::Q, llama::Proj::K, llama::Proj::V, llama::Proj::O,
                   llama::Proj::Gate, llama::Proj::Up, llama::Proj::Down});
  std::size_t base_bytes = 0;
  for (int l = 0; l < cfg.n_layer; ++l)
    for (int p = 0; p < llama::kProjections; ++p)
      base_bytes +=
          model.projection(l, static_cast<llama::Proj>(p)).layer().frozen().stored_bytes();
  auto params = model.parameters();
  lora::AdamW<float> optimizer(params, lora::AdamWOptions{});
  std::vector<int> tokens(static_cast<std::size_t>(kBatch) * kSeqLen);
  for (auto& t : tokens) t = static_cast<int>(rng.next() % static_cast<std::uint64_t>(cfg.n_vocab));
  for (auto _ : state) {
    model.zero_grad();
    model.forward(tokens, kSeqLen);
    benchmark::DoNotOptimize(model.loss_and_grad());
    model.backward();
    lora::clip_grad_norm(params, 1.0f);
    optimizer.step();
  }
  state.counters["tokens_per_s"] = benchmark::Counter(
      static_cast<double>(tokens.size()) * static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate);
  state.counters["base_bytes"] = static_cast<double>(base_bytes);
  state.counters["peak_rss_mb"] = peak_rss_mb();
}

void BM_LlamaTrainStep(benchmark::State& s) {
  BM_LlamaTrainStepOn<lora::DenseFrozenWeight<float>>(s);
}
void BM_LlamaTrainStepBf16(benchmark::State& s) {
  BM_LlamaTrainStepOn<lora::Bf16FrozenWeight>(s);
}
void BM_LlamaTrainStepNf4(benchmark::State& s) {
  BM_LlamaTrainStepOn<lora::Nf4FrozenWeight>(s);
}

BENCHMARK(BM_LlamaTrainStep)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LlamaTrainStepBf16)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LlamaTrainStepNf4)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
