// Data-parallel training over MPI, run by ctest under `mpiexec -n 2`. Every rank also runs the
// single-process reference on the whole batch, so the comparison needs no communication.
#include <gtest/gtest.h>
#include <mpi.h>

#include "lora/lora.hpp"
#include "lora/mpi.hpp"
#include "lora/optim.hpp"

#include <cstdio>
#include <string>
#include <vector>

namespace {

using Matrix = Eigen::MatrixXf;

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

Matrix random_matrix(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed) {
  lora::Rng rng(seed);
  Matrix m(rows, cols);
  lora::fill_normal(m, rng, 0.0, 1.0);
  return m;
}

struct Problem {
  static constexpr Eigen::Index d = 12, k = 10, n = 16;
  Matrix W0 = random_matrix(d, k, 1);
  Matrix X = random_matrix(k, n, 2);
  // Target: a rank-2 change of the frozen layer.
  Matrix Y = (W0 + 0.3f * random_matrix(d, 2, 3) * random_matrix(2, k, 4)) * X;
};

lora::LoRAConfig config(std::uint64_t seed, int rank = 4) {
  lora::LoRAConfig cfg;
  cfg.rank = rank;
  cfg.alpha = 8;
  cfg.seed = seed;
  return cfg;
}

// One SGD step on 0.5·mean over columns of ||H − Y||² for the given columns of the batch, with
// the mean taken over `denominator` columns.
void train_step(lora::LoRALinear<float>& layer, lora::SGD<float>& sgd, const Matrix& X,
                const Matrix& Y, float denominator) {
  sgd.zero_grad();
  const Matrix H = layer.forward(X);
  const Matrix G = (H - Y) / denominator;  // dL/dH
  layer.backward_without_input_grad(X, G);
}

TEST(MpiDataParallel, TwoRanksMatchOneProcessAndStayIdentical) {
  ASSERT_EQ(world_size(), 2) << "run with mpiexec -n 2";
  const Problem p;
  constexpr int kSteps = 25;
  const lora::SGDOptions options{0.05, 0.9, 0.0, false};

  // Reference: one process, whole batch.
  lora::LoRALinear<float> reference(p.W0, config(7));
  reference.B().setConstant(0.01f);  // start away from B = 0 so both factors move at once
  lora::SGD<float> reference_sgd(lora::adapter_parameters(reference), options);
  for (int step = 0; step < kSteps; ++step) {
    train_step(reference, reference_sgd, p.X, p.Y, float(Problem::n));
    reference_sgd.step();
  }

  // Data parallel: each rank starts from a different seed (the broadcast must fix that) and sees
  // only its half of the columns; gradients are of the full-batch mean loss, hence / n.
  lora::LoRALinear<float> layer(p.W0, config(7 + 100 * world_rank()));
  layer.B().setConstant(world_rank() == 0 ? 0.01f : 5.0f);
  lora::SGD<float> sgd(lora::adapter_parameters(layer), options);
  lora::mpi::DataParallel<float> dp(MPI_COMM_WORLD, lora::adapter_parameters(layer));
  dp.broadcast_parameters(0);
  ASSERT_TRUE(dp.parameters_in_sync());

  const Eigen::Index half = Problem::n / 2, first = world_rank() * half;
  const Matrix X_shard = p.X.middleCols(first, half), Y_shard = p.Y.middleCols(first, half);
  for (int step = 0; step < kSteps; ++step) {
    // The local loss is the shard's part of the full mean, so the SUM over ranks is the full
    // gradient; DataParallel averages, hence the factor size() here.
    train_step(layer, sgd, X_shard, Y_shard, float(Problem::n) / float(dp.size()));
    dp.average_gradients();
    sgd.step();
  }

  EXPECT_TRUE(dp.parameters_in_sync()) << "ranks drifted apart";
  const float tolerance = 1e-5f;
  EXPECT_LE((layer.A() - reference.A()).norm(), tolerance * reference.A().norm());
  EXPECT_LE((layer.B() - reference.B()).norm(), tolerance * reference.B().norm());
  EXPECT_TRUE(layer.frozen().weight() == p.W0) << "frozen weight changed";
  EXPECT_EQ(dp.bytes_per_step(), int(sizeof(float)) * 4 * (Problem::d + Problem::k));
}

TEST(MpiDataParallel, GradientsAreAveragedExactly) {
  const Problem p;
  lora::LoRALinear<float> layer(p.W0, config(3));
  layer.grad_A().setConstant(float(world_rank() + 1));  // ranks hold 1 and 2 → mean 1.5
  layer.grad_B().setConstant(float(4 * world_rank()));  // 0 and 4 → mean 2
  lora::mpi::DataParallel<float> dp(MPI_COMM_WORLD, lora::adapter_parameters(layer));
  dp.average_gradients();
  EXPECT_TRUE((layer.grad_A().array() == 1.5f).all());
  EXPECT_TRUE((layer.grad_B().array() == 2.0f).all());
}

TEST(MpiDataParallel, SumOverRanksAddsEveryRanksValue) {
  const Problem p;
  lora::LoRALinear<float> layer(p.W0, config(3));
  lora::mpi::DataParallel<float> dp(MPI_COMM_WORLD, lora::adapter_parameters(layer));
  EXPECT_EQ(dp.sum_over_ranks(0.25 + world_rank()), 0.25 + 1.25);  // 0.25 + 1.25 on 2 ranks
}

TEST(MpiDataParallel, BadRootIsRejected) {
  const Problem p;
  lora::LoRALinear<float> layer(p.W0, config(3));
  lora::mpi::DataParallel<float> dp(MPI_COMM_WORLD, lora::adapter_parameters(layer));
  EXPECT_THROW(dp.broadcast_parameters(2), std::invalid_argument);
  EXPECT_THROW(dp.broadcast_parameters(-1), std::invalid_argument);
}

TEST(MpiDataParallel, MismatchedLayoutFailsOnEveryRankWithoutHanging) {
  const Problem p;
  // Rank 1 builds its layer with another rank: its adapter shapes differ.
  lora::LoRALinear<float> layer(p.W0, config(5, world_rank() == 0 ? 4 : 3));
  try {
    lora::mpi::DataParallel<float> dp(MPI_COMM_WORLD, lora::adapter_parameters(layer));
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("ranks disagree on the parameter layout"), std::string::npos) << message;
    EXPECT_NE(message.find(world_rank() == 0 ? "4 x 10" : "3 x 10"), std::string::npos) << message;
  }
  // The communicator is still usable afterwards: nobody is stuck in a collective.
  int one = 1, total = 0;
  MPI_Allreduce(&one, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  EXPECT_EQ(total, world_size());
}

}  // namespace

// GoogleTest under MPI: every rank runs every test; the process fails if any rank failed.
int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0, any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (failed) std::fprintf(stderr, "rank %d: tests failed\n", world_rank());
  MPI_Finalize();
  return any_failed;
}
