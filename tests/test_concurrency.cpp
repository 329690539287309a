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
