// The thread-safety contract of the README: const members of one layer may run from many threads
// at once, and separate layers are independent. Every result is compared bit for bit with the
// same computation run on one thread. Built with the `tsan` preset these tests also prove the
// absence of data races (ThreadSanitizer), which a comparison alone cannot.
#include "test_helpers.hpp"

#include <lora/lora.hpp>

#include <atomic>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace {

constexpr int kThreads = 8;

template <typename M>
bool bit_equal(const M& a, const M& b) {
  using Scalar = typename M::Scalar;
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(Scalar) * static_cast<std::size_t>(a.size())) == 0;
}

template <typename T>
Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> random_matrix(Eigen::Index rows, Eigen::Index cols,
                                                               std::uint64_t seed) {
  lora::Rng rng(seed);
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> m(rows, cols);
  lora::fill_normal(m, rng, 0.0, 1.0);
  return m;
}

/// Runs body(thread_index) on kThreads threads released together, so that they really overlap.
template <typename Body>
void run_threads(Body body) {
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      ready.fetch_add(1);
      while (ready.load() < kThreads) std::this_thread::yield();
      body(t);
    });
  for (auto& th : threads) th.join();
}

template <typename T>
void shared_const_forward(bool merged) {
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  lora::LoRAConfig cfg;
  cfg.rank = 4;
  cfg.seed = 3;
  lora::LoRALinear<T> owner(random_matrix<T>(96, 80, 1), random_matrix<T>(96, 1, 2).col(0), cfg);
  owner.B() = random_matrix<T>(96, 4, 3);
  if (merged) owner.merge();
  const lora::LoRALinear<T>& layer = owner;

  // One input per thread (different batch sizes), and the one-thread answer for each.
  std::vector<Matrix> inputs, expected;
  for (int t = 0; t < kThreads; ++t) {
    inputs.push_back(random_matrix<T>(80, 1 + 7 * t, 10 + t));
    expected.push_back(layer.forward(inputs.back()));
  }
  std::vector<int> mismatches(kThreads, 0);
  run_threads([&](int t) {
    lora::Workspace<T> ws;  // the out-parameter overload: one workspace per thread
    Matrix H(96, inputs[t].cols());
    for (int rep = 0; rep < 20; ++rep) {
      const int i = (t + rep) % kThreads;  // every thread runs every input
      if (!bit_equal(layer.forward(inputs[i]), expected[i])) ++mismatches[t];
      H.resize(96, inputs[i].cols());
      layer.forward(inputs[i], H, ws);
      if (!bit_equal(H, expected[i])) ++mismatches[t];
      if (layer.weight().rows() != 96 || layer.A().rows() != 4) ++mismatches[t];
    }
  });
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(mismatches[t], 0) << "thread " << t;
}

TEST(Concurrency, SharedConstLayerForwardFrom8ThreadsEqualsOneThread) {
  shared_const_forward<float>(false);
  shared_const_forward<double>(false);
}

TEST(Concurrency, SharedMergedLayerForwardFrom8ThreadsEqualsOneThread) {
  shared_const_forward<float>(true);
}

/// Trains a fresh layer for `steps` SGD steps on its own data; returns its layer.
lora::LoRALinear<float> train(int id, int steps) {
  using Matrix = Eigen::MatrixXf;
  lora::LoRAConfig cfg;
  cfg.rank = 3;
  cfg.alpha = 2;  // s = 2/3 and a small step: the run converges, so every number stays finite
  cfg.seed = 100 + static_cast<std::uint64_t>(id);
  const auto mode = id % 2 ? lora::MergeMode::ExactRestore : lora::MergeMode::InPlace;
  lora::LoRALinear<float> layer(
      lora::DenseFrozenWeight<float>(random_matrix<float>(40, 24, 200 + id), mode),
      Eigen::VectorXf(), cfg);
  const Matrix X = random_matrix<float>(24, 16, 300 + id);
  const Matrix Y = random_matrix<float>(40, 16, 400 + id);
  Matrix H(40, 16), G(40, 16), dX(24, 16);
  lora::Workspace<float> ws;
  for (int step = 0; step < steps; ++step) {
    layer.forward(X, H, ws);
    G = (H - Y) / 16.0f;
    layer.zero_grad();
    layer.backward(X, G, dX, ws);
    layer.A() -= 0.01f * layer.grad_A();
    layer.B() -= 0.01f * layer.grad_B();
    if (step % 10 == 9) {  // merge and unmerge too: they change the frozen side
      layer.merge();
      layer.forward(X, H, ws);
      layer.unmerge();
    }
  }
  return layer;
}

TEST(Concurrency, SeparateLayersTrainConcurrentlyAsTheyDoAlone) {
  const int steps = 30;
  std::vector<lora::LoRALinear<float>> alone;
  for (int id = 0; id < kThreads; ++id) alone.push_back(train(id, steps));

  std::vector<std::unique_ptr<lora::LoRALinear<float>>> together(kThreads);
  run_threads(
      [&](int t) { together[t] = std::make_unique<lora::LoRALinear<float>>(train(t, steps)); });

  for (int id = 0; id < kThreads; ++id) {
    SCOPED_TRACE(id);
    EXPECT_TRUE(bit_equal(together[id]->A(), alone[id].A()));
    EXPECT_TRUE(bit_equal(together[id]->B(), alone[id].B()));
    EXPECT_TRUE(bit_equal(together[id]->weight(), alone[id].weight()));
    EXPECT_GT(alone[id].B().norm(), 0.0f);  // training did move the adapter
    EXPECT_TRUE(alone[id].all_finite());
  }
}

}  // namespace

// ---- the adapter store: 1,000 registered, 64 resident, 4 threads serving while adapters are
// ---- replaced, evicted and reloaded
namespace store_test {

constexpr int kD = 24, kK = 20, kRank = 4, kRegistered = 1000, kResident = 64;
constexpr int kServers = 4, kBatches = 150, kColumns = 8;
using Matrix = Eigen::MatrixXf;

/// Adapter `id` at `version`: a deterministic rank-4 adapter for the one module "proj".
lora::LoRAAdapter<float> make(int id, int version) {
  lora::LoRAConfig cfg;
  cfg.rank = kRank;
  cfg.alpha = 2.0 + id % 5;
  cfg.seed = static_cast<std::uint64_t>(id) * 1000 + static_cast<std::uint64_t>(version);
  lora::LoRAAdapter<float> a(kD, kK, cfg);
  lora::Rng rng(cfg.seed + 7);
  lora::fill_normal(a.B(), rng, 0.0, 0.5);
  return a;
}

lora::peft::AdapterStore<float>::Loader loader(int id, int version) {
  return [id, version] {
    lora::peft::AdapterFile<float> f;
    f.modules.emplace("proj", make(id, version));
    return f;
  };
}

/// The single-adapter output of column x, computed densely in double: (W0 + s B A) x + b.
Eigen::VectorXd reference(const Matrix& W0, const Eigen::VectorXf& b, int id, int version,
                          const Eigen::VectorXf& x) {
  Eigen::MatrixXd W = W0.cast<double>();
  if (id >= 0) {
    const auto a = make(id, version);
    W += double(a.scaling()) * a.B().cast<double>() * a.A().cast<double>();
  }
  return W * x.cast<double>() + b.cast<double>();
}

}  // namespace store_test

TEST(Concurrency, AdapterStoreServesMixedBatchesWhileAdaptersLoadEvictAndSwap) {
  using namespace store_test;
  const Matrix W0 = random_matrix<float>(kD, kK, 1);
  const Eigen::VectorXf bias = random_matrix<float>(kD, 1, 2).col(0);
  const lora::DenseFrozenWeight<float> base(W0);
  const std::size_t one = lora::peft::AdapterStore<float>::bytes_of(loader(0, 0)());
  lora::peft::AdapterStore<float> store(kResident * one);
  for (int i = 0; i < kRegistered; ++i) store.add("adapter" + std::to_string(i), loader(i, 0));
  EXPECT_EQ(store.resident_count(), 0u);  // registered, none loaded

  // committed[i]: the version replace() has installed (a batch that starts later must see it).
  std::vector<std::atomic<int>> committed(kRegistered);
  for (auto& c : committed) c.store(0);
  std::atomic<bool> serving{true};
  std::vector<int> wrong(kServers, 0), over_budget(kServers, 0);

  std::thread maintenance([&] {  // replaces (hot swaps) and evicts while the servers run
    lora::Rng rng(99);
    while (serving.load()) {
      const int id = static_cast<int>(rng.next() % 96);  // among the hot adapters
      if (rng.next() % 2 == 0) {
        const int v = committed[id].load() + 1;
        store.replace(id, loader(id, v));
        committed[id].store(v);
      } else {
        store.evict(id);
      }
      std::this_thread::yield();
    }
  });
  std::vector<std::thread> servers;
  for (int t = 0; t < kServers; ++t)
    servers.emplace_back([&, t] {
      lora::Rng rng(static_cast<std::uint64_t>(t) + 10);
      lora::Workspace<float> ws;
      Matrix X(kK, kColumns), H(kD, kColumns);
      std::vector<int> ids(kColumns), before(kColumns);
      for (int batch = 0; batch < kBatches; ++batch) {
        lora::fill_normal(X, rng, 0.0, 1.0);
        for (int j = 0; j < kColumns; ++j) {
          const auto r = rng.next() % 100;
          // Mostly hot adapters (hits, swaps), some cold ones (loads that evict), a few bases.
          ids[j] = r < 5    ? -1
                   : r < 75 ? static_cast<int>(rng.next() % 96)
                            : static_cast<int>(rng.next() % kRegistered);
          before[j] = ids[j] < 0 ? 0 : committed[ids[j]].load();
        }
        store.forward_mixed(base, bias, "proj", X, ids, H, ws);
        if (store.resident_count() > static_cast<std::size_t>(kResident)) ++over_budget[t];
        for (int j = 0; j < kColumns; ++j) {
          // Not older than what was committed before the batch; at most the one replace() in
          // flight newer than what is committed after it.
          const int last = ids[j] < 0 ? 0 : committed[ids[j]].load() + 1;
          bool match = false;
          for (int v = before[j]; v <= last && !match; ++v) {
            const Eigen::VectorXd ref = reference(W0, bias, ids[j], v, X.col(j));
            match = (H.col(j).cast<double>() - ref).cwiseAbs().maxCoeff() <=
                    1e-4 * (1 + ref.cwiseAbs().maxCoeff());
          }
          if (!match) ++wrong[t];
        }
      }
    });
  for (auto& s : servers) s.join();
  serving.store(false);
  maintenance.join();
  for (int t = 0; t < kServers; ++t) {
    EXPECT_EQ(wrong[t], 0) << "server " << t << ": columns matching no current adapter version";
    EXPECT_EQ(over_budget[t], 0) << "server " << t;
  }
  EXPECT_LE(store.resident_bytes(), store.byte_budget());
  EXPECT_GT(store.loads(), static_cast<std::uint64_t>(kResident));  // evicted and reloaded
}
