// Data-parallel training over MPI on the digits: every rank holds the whole model and trains on
// its share of each global batch; after backward the gradients are averaged across ranks in one
// allreduce (lora::mpi::DataParallel), so every rank takes the same optimizer step.
//
//   1. upstream: the MLP 64-128-128-10 trained fully, data parallel (every weight crosses the
//      network each step);
//   2. downstream (digits rotated 90 degrees): the base frozen, LoRA r = 8 on every layer, data
//      parallel (only A and B cross the network: the point of this example);
//   3. the same downstream training in one process, run on every rank as the reference: with
//      gradient accumulation over the same slices the adapters must be bit-identical (2 ranks);
//      on whole batches they differ only by float summation order.
//
// Run:  mpiexec -n 2 build/examples/digits_data_parallel [--quick]
// (as root, or with more ranks than cores, Open MPI also wants --allow-run-as-root
// --oversubscribe). Exit status 1 when a check fails.
#include "digits/dataset.hpp"
#include "digits/mlp.hpp"

#include <lora/core.hpp>
#include <lora/mpi.hpp>
#include <lora/optim.hpp>

#include <mpi.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#ifndef DIGITS_DATA_FILE
#define DIGITS_DATA_FILE "examples/data/digits.csv.gz"
#endif

namespace {

using digits::Dataset;
using digits::DenseLinear;
using digits::Mlp;
using Matrix = Eigen::MatrixXf;
using LoRALayer = lora::LoRALinear<float>;

constexpr int kGlobalBatch = 64;

struct Settings {
  bool quick = false;
  int upstream_epochs = 30;
  int lora_epochs = 30;
};

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

// Prints on rank 0 only (printf-checked by the compiler).
__attribute__((format(printf, 1, 2))) void say(const char* format, ...) {
  if (world_rank() != 0) return;
  std::va_list args;
  va_start(args, format);
  std::vprintf(format, args);
  va_end(args);
}

/// AdamW over shuffled global batches of kGlobalBatch columns, each cut into `slices` slices
/// (sizes differ by at most one), one per rank.
///  - With `dp`: this rank computes its slice's gradient and the gradients are averaged across
///    ranks (one allreduce) before the step.
///  - Without: one process computes every slice's gradient and averages them itself, summing in
///    rank order: gradient accumulation. For 2 ranks the allreduce's sum is the same float sum,
///    so the result must be bit-identical. With slices = 1 it is plain whole-batch training,
///    which differs from the above only in float summation order.
/// `max_steps` > 0 stops after that many optimizer steps; a null `label` prints nothing.
template <typename Layer>
void train(Mlp<Layer>& model, const Dataset& data, int epochs, double lr,
           lora::mpi::DataParallel<float>* dp, int slices, const char* label, int max_steps = 0) {
  lora::AdamWOptions options;
  options.lr = lr;
  options.weight_decay = 0;
  const auto params = model.parameters();
  lora::AdamW<float> opt(params, options);
  std::vector<Matrix> sum(params.size());
  lora::Rng rng(5);  // the same shuffle on every rank
  const int n = static_cast<int>(data.size());
  Matrix Xb(data.X.rows(), kGlobalBatch);
  std::vector<int> yb(kGlobalBatch);
  int steps = 0;
  for (int epoch = 1; epoch <= epochs; ++epoch) {
    const std::vector<int> order = digits::permutation(n, rng);
    double loss = 0;
    for (int start = 0; start < n; start += kGlobalBatch) {
      const int global = std::min(kGlobalBatch, n - start);
      const int first = dp ? dp->rank() : 0, last = dp ? dp->rank() : slices - 1;
      for (int slice = first; slice <= last; ++slice) {
        const int lo = start + global * slice / slices, hi = start + global * (slice + 1) / slices;
        const int m = hi - lo;
        opt.zero_grad();
        if (m > 0) {
          for (int j = 0; j < m; ++j) {
            Xb.col(j) = data.X.col(order[std::size_t(lo + j)]);
            yb[std::size_t(j)] = data.y[std::size_t(order[std::size_t(lo + j)])];
          }
          // The slice's loss is the mean over m columns, the global one over `global`:
          // weighting by m·slices/global makes the average over slices the global gradient.
          loss += m * model.forward_backward(Xb.leftCols(m), yb.data());
          const float weight = float(m) * float(slices) / float(global);
          for (auto p : params) p.grad *= weight;  // a view: scales the layer's gradient
        }
        if (!dp) {
          for (std::size_t i = 0; i < params.size(); ++i) {
            if (slice == 0)
              sum[i] = params[i].grad;
            else
              sum[i] += params[i].grad;
          }
        }
      }
      if (dp) {
        dp->average_gradients();  // one allreduce for all layers
      } else {
        const float inverse = 1.0f / float(slices);
        for (std::size_t i = 0; i < params.size(); ++i) {
          auto grad = params[i].grad;
          grad = inverse * sum[i];
        }
      }
      opt.step();
      if (++steps == max_steps) return;
    }
    if (dp) loss = dp->sum_over_ranks(loss);  // every rank's share of the epoch's loss
    if (label && (epoch == 1 || epoch == epochs || epoch % 10 == 0)) {
      say("  %-26s epoch %2d/%d  loss %.4f\n", label, epoch, epochs, loss / n);
    }
  }
}

template <typename Layer>
double accuracy(const Mlp<Layer>& model, const Dataset& d) {
  return 100.0 * digits::count_correct(model.predict(d.X), d.y) / double(d.size());
}

double max_relative_difference(Mlp<LoRALayer>& a, Mlp<LoRALayer>& b) {
  double worst = 0;
  const auto pa = a.parameters(), pb = b.parameters();
  for (std::size_t i = 0; i < pa.size(); ++i) {
    worst = std::max(worst, double((pa[i].value - pb[i].value).norm() / pb[i].value.norm()));
  }
  return worst;
}

int run(const Settings& s) {
  const Dataset all = digits::load_csv_gz(DIGITS_DATA_FILE);
  auto [train_up, test_up] = digits::split(all, 0.2, /*seed=*/2024);
  const Dataset train_down = digits::rotate90(train_up), test_down = digits::rotate90(test_up);

  // 1. Upstream, every weight trained, data parallel.
  Mlp<DenseLinear<float>> base = digits::make_base_mlp();
  lora::mpi::DataParallel<float> base_dp(MPI_COMM_WORLD, base.parameters());
  say("digits, data parallel on %d ranks, global batch %d\n", base_dp.size(), kGlobalBatch);
  say("\n[1] upstream: full training of the MLP 64-128-128-10\n");
  base_dp.broadcast_parameters();
  train(base, train_up, s.upstream_epochs, 2e-3, &base_dp, base_dp.size(), "base (all weights)");
  const double upstream = accuracy(base, test_up);
  const bool base_in_sync = base_dp.parameters_in_sync();

  // 2. Downstream: LoRA r = 8, data parallel. Each rank draws A from its own seed; the broadcast
  // makes rank 0's the starting point everywhere.
  say("\n[2] downstream (rotated digits): LoRA r = 8 on every layer, base frozen\n");
  auto model = digits::make_lora_mlp(base, 8, 100 + 1000 * std::uint64_t(base_dp.rank()));
  lora::mpi::DataParallel<float> dp(MPI_COMM_WORLD, model.parameters());
  dp.broadcast_parameters();
  train(model, train_down, s.lora_epochs, 5e-3, &dp, dp.size(), "LoRA r=8 (A and B)");
  model.eval();
  const double downstream = accuracy(model, test_down);
  const bool lora_in_sync = dp.parameters_in_sync();

  // 3. One-process references from rank 0's starting adapters: gradient accumulation over the
  // same slices (bit-identical expected for 2 ranks), and plain whole-batch training.
  say("\n[3] references: the same downstream training in one process\n");
  auto accumulated = digits::make_lora_mlp(base, 8, 100);
  train(accumulated, train_down, s.lora_epochs, 5e-3, nullptr, dp.size(),
        "one process, accumulated");
  auto whole = digits::make_lora_mlp(base, 8, 100);
  train(whole, train_down, s.lora_epochs, 5e-3, nullptr, 1, "one process, whole batch");
  whole.eval();
  const double whole_accuracy = accuracy(whole, test_down);
  const double accumulated_difference = max_relative_difference(model, accumulated);
  const double whole_difference = max_relative_difference(model, whole);
  // After one step from the same start, whole-batch and sliced training differ by float summation
  // order alone (the averaging weights m * slices / global are exact in the sum): to rounding.
  auto one_step_sliced = digits::make_lora_mlp(base, 8, 100);
  auto one_step_whole = digits::make_lora_mlp(base, 8, 100);
  train(one_step_sliced, train_down, 1, 5e-3, nullptr, dp.size(), nullptr, 1);
  train(one_step_whole, train_down, 1, 5e-3, nullptr, 1, nullptr, 1);
  const double first_step_difference = max_relative_difference(one_step_sliced, one_step_whole);

  const long long lora_bytes = dp.bytes_per_step(), full_bytes = base_dp.bytes_per_step();
  say("\nresults (rank 0; every rank holds the same model)\n");
  say("  upstream test accuracy          %.2f%%\n", upstream);
  say("  downstream, data parallel       %.2f%%\n", downstream);
  say("  downstream, one process         %.2f%% (whole batches)\n", whole_accuracy);
  say("  adapters vs one process         max relative difference %.2e (accumulating the same "
      "slices), %.2e (whole batches: float summation order, amplified by AdamW; %.2e after the "
      "first step)\n",
      accumulated_difference, whole_difference, first_step_difference);
  say("  sent per rank per step          LoRA r = 8: %lld bytes (%lld numbers); full model: %lld "
      "bytes, %.1fx more\n",
      lora_bytes, (long long)dp.parameter_count(), full_bytes,
      double(full_bytes) / double(lora_bytes));

  // Bit-identity with accumulation holds for 2 ranks (a 2-term float sum commutes); MPI may sum
  // more ranks in another order. Whole-batch training differs from it by rounding after one step
  // (7e-8 measured; checked at 1e-6), then drifts chaotically: AdamW divides each gradient by its
  // own running size, so rounding in a near-zero gradient becomes an O(lr) step, and every later
  // gradient depends on it. How far it drifts depends on the trajectory, not on the averaging (it
  // moved from 1e-4 to 2e-2 when changes elsewhere moved the rounding), so the --quick run bounds
  // it loosely.
  const bool exact = dp.size() != 2 || accumulated_difference == 0;
  const bool near = first_step_difference < 1e-6 && (!s.quick || whole_difference < 5e-2);
  const bool ok = base_in_sync && lora_in_sync && exact && near;
  say("checks: ranks bit-identical (base %s, adapters %s); equal to one-process accumulation: "
      "%s; %s\n",
      base_in_sync ? "yes" : "NO", lora_in_sync ? "yes" : "NO", exact ? "yes" : "NO",
      near ? "near whole-batch training: yes" : "near whole-batch training: NO");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  Settings s;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      s.quick = true;
      s.upstream_epochs = 8;
      s.lora_epochs = 8;
    }
  }
  int status = 1;
  try {
    status = run(s);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: error: %s\n", world_rank(), e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  int worst = 0;
  MPI_Allreduce(&status, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst;
}
