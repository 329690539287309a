// Data-parallel adapter training over MPI: every rank holds the same model and a shard of the
// batch; after backward, the adapter gradients are averaged across ranks in ONE fused allreduce.
//
// Why it is cheap: a LoRA layer's trainable state is r·(d+k) numbers, so that is all that
// crosses the network per step, against d·k for full fine-tuning (4096×4096, r = 8: 256 KiB
// instead of 64 MiB per layer in fp32). Frozen weights are never sent.
//
// Optional: include it explicitly (it is not in lora/lora.hpp) and link MPI (CMake:
// find_package(MPI COMPONENTS CXX), target MPI::MPI_CXX).
#pragma once

#include "lora/detail/check.hpp"
#include "lora/optim.hpp"

#include <mpi.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora::mpi {

/// Thrown when an MPI call fails (the communicator is set to return errors rather than abort).
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

inline void check(int code, const char* call) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw Error(lora::detail::concat("lora::mpi: ", call, " failed: ", std::string(text, length)));
}

template <typename T>
MPI_Datatype datatype() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "lora::mpi supports float and double parameters.");
  return std::is_same_v<T, float> ? MPI_FLOAT : MPI_DOUBLE;
}

/// FNV-1a over bytes: a cheap fingerprint to compare layouts or values across ranks.
inline std::uint64_t fnv1a(const void* data, std::size_t bytes, std::uint64_t h) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ULL;
  return h;
}
constexpr std::uint64_t kFnvOffset = 14695981039346656037ULL;

}  // namespace detail

/// Averages the gradients of a fixed set of parameters across the ranks of a communicator, and
/// broadcasts their values, each in a single collective over one contiguous buffer.
///
/// Usage, once per step on every rank (each on its own shard, loss averaged over the shard):
///   lora::mpi::DataParallel<float> dp(MPI_COMM_WORLD, params);  // collective; checks layouts
///   dp.broadcast_parameters();                                  // once: all ranks start equal
///   ... forward/backward on the local shard ...
///   dp.average_gradients();                                      // grads = mean over ranks
///   optimizer.step();
/// With equal shard sizes the averaged gradient equals the full-batch gradient, so N ranks take
/// the same steps as one process on the whole batch (up to float summation order).
///
/// Construction and every call are collective: all ranks must make them in the same order.
/// Destroy it before MPI_Finalize. Not thread-safe; one object per training loop.
template <typename T>
class DataParallel {
 public:
  /// Duplicates `comm` (so lora's messages never mix with the caller's) and checks, with a
  /// collective that cannot hang, that every rank passed the same number of parameters with the
  /// same shapes. A mismatch throws std::invalid_argument on every rank, naming the shapes.
  DataParallel(MPI_Comm comm, std::vector<ParameterView<T>> params) : params_(std::move(params)) {
    detail::check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    detail::check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    detail::check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
    try {
      check_same_layout_on_all_ranks();
    } catch (...) {
      MPI_Comm_free(&comm_);
      throw;
    }
    buffer_.resize(static_cast<std::size_t>(count_));
  }

  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  ~DataParallel() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }

  /// This process's rank in the communicator.
  int rank() const { return rank_; }
  /// The number of ranks.
  int size() const { return size_; }

  /// Numbers exchanged per step (the total size of all parameters), and their bytes: what each
  /// rank contributes to the allreduce. A ring allreduce moves about 2·(p−1)/p of it per rank.
  std::int64_t parameter_count() const { return count_; }
  /// parameter_count() in bytes.
  std::int64_t bytes_per_step() const { return count_ * static_cast<std::int64_t>(sizeof(T)); }

  /// grad ← (Σ over ranks of grad) / size, for every parameter: one MPI_Allreduce.
  void average_gradients() {
    lora::detail::require_valid("lora::mpi::DataParallel::average_gradients", params_);
    pack([](const ParameterView<T>& p) -> const auto& { return p.grad; });
    detail::check(MPI_Allreduce(MPI_IN_PLACE, buffer_.data(), static_cast<int>(count_),
                                detail::datatype<T>(), MPI_SUM, comm_),
                  "MPI_Allreduce");
    const T inverse = T(1) / static_cast<T>(size_);
    unpack(
        [](ParameterView<T> & p) -> auto& { return p.grad; }, inverse);
    // Another rank's columns of a column-sparse gradient are now here too: step them all.
    for (auto& p : params_)
      if (p.columns != nullptr) p.columns->mark_all();
  }

  /// value ← value on `root`, for every parameter: one MPI_Bcast. Call once before training so
  /// that every rank starts from the same adapters whatever seed it used.
  void broadcast_parameters(int root = 0) {
    lora::detail::require(root >= 0 && root < size_,
                          "lora::mpi::DataParallel: root must be in [0, ", size_, "), got ", root);
    lora::detail::require_valid("lora::mpi::DataParallel::broadcast_parameters", params_);
    pack([](const ParameterView<T>& p) -> const auto& { return p.value; });
    detail::check(
        MPI_Bcast(buffer_.data(), static_cast<int>(count_), detail::datatype<T>(), root, comm_),
        "MPI_Bcast");
    unpack(
        [](ParameterView<T> & p) -> auto& { return p.value; }, T(1));
  }

  /// Σ over ranks of `value` (an MPI_Allreduce of one double): for metrics such as the loss.
  double sum_over_ranks(double value) {
    double total = 0;
    detail::check(MPI_Allreduce(&value, &total, 1, MPI_DOUBLE, MPI_SUM, comm_), "MPI_Allreduce");
    return total;
  }

  /// True when every rank holds bit-identical parameter values (a fingerprint compared with
  /// MIN/MAX allreduces): a cheap check that ranks have not drifted apart.
  bool parameters_in_sync() {
    std::uint64_t h = detail::kFnvOffset;
    for (const auto& p : params_) {
      h = detail::fnv1a(p.value.data(), static_cast<std::size_t>(p.value.size()) * sizeof(T), h);
    }
    return same_on_all_ranks({h});
  }

 private:
  void check_same_layout_on_all_ranks() {
    std::uint64_t h = detail::kFnvOffset;
    std::string shapes;
    count_ = 0;
    for (const auto& p : params_) {
      lora::detail::require(p.value.rows() == p.grad.rows() && p.value.cols() == p.grad.cols(),
                            "lora::mpi::DataParallel: a parameter's value is ",
                            lora::detail::shape_string(p.value.rows(), p.value.cols()),
                            " but its gradient is ",
                            lora::detail::shape_string(p.grad.rows(), p.grad.cols()));
      const std::int64_t dims[2] = {p.value.rows(), p.value.cols()};
      h = detail::fnv1a(dims, sizeof(dims), h);
      count_ += p.value.size();
      shapes +=
          (shapes.empty() ? "" : ", ") + lora::detail::shape_string(p.value.rows(), p.value.cols());
    }
    const std::uint64_t n = params_.size();
    lora::detail::require(count_ <= std::int64_t{2147483647},
                          "lora::mpi::DataParallel: at most 2^31-1 numbers per allreduce, got ",
                          count_);
    if (!same_on_all_ranks({n, static_cast<std::uint64_t>(count_), h})) {
      throw std::invalid_argument(lora::detail::concat(
          "lora::mpi::DataParallel: ranks disagree on the parameter layout; every rank must pass "
          "the same parameters with the same shapes. Rank ",
          rank_, " has ", n, " parameters (", count_, " numbers): ", shapes));
    }
  }

  /// One MIN and one MAX allreduce of the values: equal on all ranks iff min == max everywhere.
  bool same_on_all_ranks(std::vector<std::uint64_t> values) {
    std::vector<std::uint64_t> lo(values.size()), hi(values.size());
    const int n = static_cast<int>(values.size());
    detail::check(MPI_Allreduce(values.data(), lo.data(), n, MPI_UINT64_T, MPI_MIN, comm_),
                  "MPI_Allreduce");
    detail::check(MPI_Allreduce(values.data(), hi.data(), n, MPI_UINT64_T, MPI_MAX, comm_),
                  "MPI_Allreduce");
    return lo == hi;
  }

  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

  // ParameterView maps are contiguous and column-major, so each is one block of the buffer.
  template <typename Select>
  void pack(Select select) {
    T* out = buffer_.data();
    for (const auto& p : params_) {
      const auto& m = select(p);
      Eigen::Map<Matrix>(out, m.rows(), m.cols()) = m;
      out += m.size();
    }
  }

  template <typename Select>
  void unpack(Select select, T factor) {
    const T* in = buffer_.data();
    for (auto& p : params_) {
      auto& m = select(p);
      m = factor * Eigen::Map<const Matrix>(in, m.rows(), m.cols());
      in += m.size();
    }
  }

  std::vector<ParameterView<T>> params_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  std::int64_t count_ = 0;
  std::vector<T> buffer_;
};

}  // namespace lora::mpi
