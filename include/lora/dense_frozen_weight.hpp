// DenseFrozenWeight<T>: the frozen base weight W0 of a LoRA layer, stored as a dense Eigen matrix
// of T (float or double). The reference storage of the frozen-storage contract
// (frozen_storage.hpp), and the default of every layer.
#pragma once

#include "lora/detail/check.hpp"
#include "lora/detail/dense_kernels.hpp"
#include "lora/detail/finite.hpp"
#include "lora/detail/frozen_storage_base.hpp"
#include "lora/detail/gemm.hpp"
#include "lora/detail/low_rank.hpp"
#include "lora/frozen_storage.hpp"

#include <Eigen/Core>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace lora {

template <typename T>
/// The frozen weight W0 (d x k) as a dense matrix of T: the reference storage of the contract in
/// frozen_storage.hpp, and every layer's default. Products run on Eigen's kernel, allocation-free;
/// where lora::blas is linked, the products of large weights with n >= 2 columns run on the BLAS
/// it was built with (DenseKernel::Auto; see backend_report()).
class DenseFrozenWeight : public detail::FrozenStorageBase<DenseFrozenWeight<T>, T> {
  using Base = detail::FrozenStorageBase<DenseFrozenWeight<T>, T>;
  friend Base;  // calls product() and transposed_product()

 public:
  using typename Base::Index;
  using typename Base::Matrix;
  using typename Base::Vector;

  /// Takes W0 (out x in, like torch.nn.Linear.weight); pass an rvalue to move it in. `mode` says
  /// how unmerge() restores W0 (InPlace, PEFT's way, is the default). `kernel` says which kernel
  /// runs the products: Auto (the default) picks per product and shape among those built in;
  /// naming one that this build lacks throws std::invalid_argument.
  explicit DenseFrozenWeight(Matrix W0, MergeMode mode = MergeMode::InPlace,
                             DenseKernel kernel = DenseKernel::Auto);

  /// d, the rows of W0 (output features).
  Index out_features() const { return weight_.rows(); }
  /// k, the columns of W0 (input features).
  Index in_features() const { return weight_.cols(); }
  /// How unmerge() restores W0, chosen at construction.
  MergeMode merge_mode() const { return mode_; }
  /// True while a delta is merged into the weight.
  bool is_merged() const { return merged_; }
  /// The products run on Eigen's kernel with per-thread buffers (detail/gemm.hpp): none allocates
  /// once the buffers have grown (unless Eigen's public products are forced, see gemm.hpp). False
  /// where a BLAS may run them and allocate per call: BLIS, and OpenBLAS on more than one thread
  /// (Eigen::nbThreads() > 1; on one thread OpenBLAS allocates nothing).
  bool allocation_free() const {
    return detail::kGemmAllocationFree && !detail::dense_kernel_may_allocate(kernel_);
  }
  /// The kernel asked for at construction (Auto: chosen per product and shape).
  DenseKernel kernel() const { return kernel_; }
  /// Which kernel ran the last call of each product, with its batch n and why; then the kernels
  /// built in. E.g. "H = W X (4096 x 4096, n = 8): BLIS (n >= 2 on a large weight: ...)".
  std::string backend_report() const;

  /// The weight in use (W0, or the merged weight), by reference: no copy.
  const Matrix& matrix() const { return weight_; }
  /// The weight in use as a new matrix (the contract's weight(); matrix() avoids the copy).
  Matrix weight() const { return weight_; }
  /// H(:, j) = W(:, ids[j]), W the weight in use: a column lookup (an embedding's rows, held as
  /// the columns of this d x k weight), O(d n), whatever k is. The ids must be in [0, k) (the
  /// layer checks); allocates nothing.
  void gather_columns(const std::vector<std::int64_t>& ids, Eigen::Ref<Matrix> H) const;
  /// True when the weight in use holds no NaN or infinity (no allocation).
  bool all_finite() const { return weight_.allFinite(); }
  /// Bytes held: W0, and the pristine copy an ExactRestore merge keeps.
  std::size_t stored_bytes() const {
    return static_cast<std::size_t>(weight_.size() + spare_.size()) * sizeof(T);
  }

  /// out(i) = ||row i of W0||, accumulated in double one column at a time (no d x k temporary).
  void row_norms(Eigen::Ref<Eigen::VectorXd> out) const;

  /// W = diag(g) (W0 + s B A) (B: d x r, A: r x k, g: d or empty for none), without a d x k
  /// temporary in the common case. ExactRestore builds it in a second buffer beside W0.
  /// Throws std::domain_error, leaving the weight as it was, where the result is not finite
  /// although W0 was (an infinity would survive unmerge() and corrupt W0 for good), and in InPlace
  /// mode where a row scale g_i or its inverse is not finite in T (unmerge() divides by g_i).
  /// InPlace mode updates in place when a cheap O(r (d + k)) bound proves that impossible, and
  /// otherwise builds the sum aside and checks it first.
  void merge(T s, const Eigen::Ref<const Matrix>& B, const Eigen::Ref<const Matrix>& A,
             const Eigen::Ref<const Vector>& g);

  /// Back to W0: a swap in ExactRestore mode (bit-exact, O(1)); in InPlace mode
  /// W = diag(1/g) W - s B A with the factors of the merge.
  void unmerge(T s, const Eigen::Ref<const Matrix>& B, const Eigen::Ref<const Matrix>& A,
               const Eigen::Ref<const Vector>& g);

  /// W0 = W (same shape; no allocation): the residual base of PiSSA and OLoRA. Throws
  /// std::logic_error while merged, std::invalid_argument for another shape.
  void rebase(const Eigen::Ref<const Matrix>& W);

 private:
  /// H = W X, or H += W X.   W: d x k,  X: k x n,  H: d x n. On Eigen::nbThreads() threads when
  /// compiled with OpenMP. (Eigen's own H = W X zeroes H, then accumulates: starting H with other
  /// terms and accumulating costs the same as the plain product.)
  void product(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H, bool accumulate) const;

  /// dX (+)= W^T G: W^T is a transposed view, no copy of W is made.   G: d x n,  dX: k x n.
  void transposed_product(const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX,
                          bool accumulate) const;

  /// dst = diag(g) (W + s B A), where W is the weight now (W0); dst may be weight_ itself.
  void build(Matrix& dst, T s, const Eigen::Ref<const Matrix>& B, const Eigen::Ref<const Matrix>& A,
             const Eigen::Ref<const Vector>& g) const;

  /// The kernel for this product and batch; recorded for backend_report() (relaxed atomics: the
  /// products are const and may run on many threads at once).
  DenseKernel choose(DenseProduct product, Index n) const;

  /// The last kernel and n of each product: (n << 3) | (kernel + 1), 0 = not run. Copies carry
  /// the values over (the atomics alone would make the storage non-copyable).
  struct KernelLog {
    std::atomic<std::uint64_t> last[3] = {};
    KernelLog() = default;
    KernelLog(const KernelLog& o) noexcept { *this = o; }
    KernelLog& operator=(const KernelLog& o) noexcept {
      for (int p = 0; p < 3; ++p) last[p].store(o.last[p].load(std::memory_order_relaxed));
      return *this;
    }
  };

  Matrix weight_;
  Matrix spare_;  // ExactRestore: the pristine W0 while merged
  MergeMode mode_;
  DenseKernel kernel_ = DenseKernel::Auto;
  mutable KernelLog log_;
  bool merged_ = false;
  double w0_max_abs_ = -1;  // InPlace: max |W0| over finite elements, measured at the first merge
};

// The members with bodies, out of the class so that they are not inline: a file that sees
// `extern template class DenseFrozenWeight<T>` (lora/extern_templates.hpp) does not instantiate
// them.

template <typename T>
DenseFrozenWeight<T>::DenseFrozenWeight(Matrix W0, MergeMode mode, DenseKernel kernel)
    : weight_(std::move(W0)), mode_(mode), kernel_(kernel) {
  detail::require(weight_.size() > 0, "DenseFrozenWeight: W0 must not be empty, got ",
                  detail::shape_string(weight_.rows(), weight_.cols()));
  detail::require(detail::dense_kernel_built(kernel), "DenseFrozenWeight: the ",
                  detail::dense_kernel_name(kernel),
                  " kernel was requested, but this build does not have it; link the lora::blas "
                  "CMake target (built on BLIS or OpenBLAS) or use DenseKernel::Auto");
}

template <typename T>
std::string DenseFrozenWeight<T>::backend_report() const {
  static constexpr const char* kNames[3] = {"H = W X", "H += W X", "dX += W^T G"};
  std::string out;
  for (int p = 0; p < 3; ++p) {
    const std::uint64_t code = log_.last[p].load(std::memory_order_relaxed);
    out += std::string(kNames[p]) + " (" + detail::shape_string(weight_.rows(), weight_.cols());
    if (code == 0) {
      out += "): not run yet\n";
      continue;
    }
    const Index n = static_cast<Index>(code >> 3);
    const auto choice = detail::choose_dense_kernel(kernel_, DenseProduct(p), weight_.rows(),
                                                    weight_.cols(), n, sizeof(T));
    out += ", n = " + std::to_string(n) +
           "): " + detail::dense_kernel_name(DenseKernel((code & 7) - 1)) + " (" + choice.why +
           ")\n";
  }
  return out + "built in: " + detail::dense_kernels_report() + detail::dense_blas_fit().note;
}

template <typename T>
void DenseFrozenWeight<T>::gather_columns(const std::vector<std::int64_t>& ids,
                                          Eigen::Ref<Matrix> H) const {
  for (std::size_t j = 0; j < ids.size(); ++j)
    H.col(static_cast<Index>(j)) = weight_.col(static_cast<Index>(ids[j]));
}

template <typename T>
void DenseFrozenWeight<T>::row_norms(Eigen::Ref<Eigen::VectorXd> out) const {
  detail::require_state(!merged_, "DenseFrozenWeight::row_norms: the weight is merged");
  detail::require(out.size() == out_features(), "DenseFrozenWeight::row_norms: out must have ",
                  out_features(), " elements, got ", out.size());
  out.setZero();
  for (Index j = 0; j < in_features(); ++j)
    out.array() += weight_.col(j).template cast<double>().array().square();
  out = out.cwiseSqrt();
}

template <typename T>
void DenseFrozenWeight<T>::merge(T s, const Eigen::Ref<const Matrix>& B,
                                 const Eigen::Ref<const Matrix>& A,
                                 const Eigen::Ref<const Vector>& g) {
  this->check_merge_call("DenseFrozenWeight::merge", true, g);
  if (mode_ == MergeMode::ExactRestore) {
    spare_.resize(weight_.rows(), weight_.cols());  // allocates on the first merge only
    build(spare_, s, B, A, g);
    detail::require_update_finite("DenseFrozenWeight::merge", spare_, weight_);
    weight_.swap(spare_);  // spare_ now holds the pristine W0
  } else {
    this->check_inverse_row_scale("DenseFrozenWeight::merge", g);
    if (w0_max_abs_ < 0) w0_max_abs_ = detail::max_abs_finite(weight_);  // W is W0 here
    const double g_max = g.size() ? static_cast<double>(g.cwiseAbs().maxCoeff()) : 1.0;
    const double g_min = g.size() ? static_cast<double>(g.cwiseAbs().minCoeff()) : 1.0;
    // |diag(g)(W0 + D)| <= g_max (w0 + delta); the unmerge divides by g again (<= that / g_min).
    const double bound = detail::low_rank_abs_bound(s, B, A);
    if (detail::update_surely_finite<T>(g_max * w0_max_abs_, g_max * bound) &&
        detail::update_surely_finite<T>(w0_max_abs_ * g_max / g_min, bound * g_max / g_min)) {
      build(weight_, s, B, A, g);
    } else {
      Matrix merged(weight_.rows(), weight_.cols());
      build(merged, s, B, A, g);
      detail::require_update_finite("DenseFrozenWeight::merge", merged, weight_);
      weight_.swap(merged);
    }
  }
  merged_ = true;
}

template <typename T>
void DenseFrozenWeight<T>::unmerge(T s, const Eigen::Ref<const Matrix>& B,
                                   const Eigen::Ref<const Matrix>& A,
                                   const Eigen::Ref<const Vector>& g) {
  this->check_merge_call("DenseFrozenWeight::unmerge", false, g);
  if (mode_ == MergeMode::ExactRestore) {
    weight_.swap(spare_);
  } else {
    if (g.size() != 0) weight_ = g.cwiseInverse().asDiagonal() * weight_;
    detail::add_low_rank(weight_, weight_, T(-s), B, A);
  }
  merged_ = false;
}

template <typename T>
void DenseFrozenWeight<T>::rebase(const Eigen::Ref<const Matrix>& W) {
  this->check_rebase_call("DenseFrozenWeight::rebase", W);
  weight_ = W;
  w0_max_abs_ = -1;  // measured again at the next InPlace merge
}

template <typename T>
void DenseFrozenWeight<T>::product(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H,
                                   bool accumulate) const {
  const DenseKernel kernel =
      choose(accumulate ? DenseProduct::MultiplyAdd : DenseProduct::Multiply, X.cols());
  if (kernel != DenseKernel::Eigen) {
    if (X.cols() == 0) return;
    detail::blas_product<T>(kernel, false, weight_.data(), weight_.rows(), weight_.cols(), X.data(),
                            X.outerStride(), X.cols(), H.data(), H.outerStride(), accumulate);
    return;
  }
  if (!accumulate) H.setZero();
  detail::gemm_add(H, weight_, X, T(1));  // (d x k)(k x n)
}

template <typename T>
void DenseFrozenWeight<T>::transposed_product(const Eigen::Ref<const Matrix>& G,
                                              Eigen::Ref<Matrix> dX, bool accumulate) const {
  const DenseKernel kernel = choose(DenseProduct::MultiplyTransposed, G.cols());
  if (kernel != DenseKernel::Eigen) {
    if (G.cols() == 0) return;
    detail::blas_product<T>(kernel, true, weight_.data(), weight_.rows(), weight_.cols(), G.data(),
                            G.outerStride(), G.cols(), dX.data(), dX.outerStride(), accumulate);
    return;
  }
  if (!accumulate) dX.setZero();
  detail::gemm_add(dX, weight_.transpose(), G, T(1));  // (k x d)(d x n)
}

template <typename T>
void DenseFrozenWeight<T>::build(Matrix& dst, T s, const Eigen::Ref<const Matrix>& B,
                                 const Eigen::Ref<const Matrix>& A,
                                 const Eigen::Ref<const Vector>& g) const {
  detail::add_low_rank(dst, weight_, s, B, A);
  if (g.size() != 0) dst = g.asDiagonal() * dst;
}

template <typename T>
DenseKernel DenseFrozenWeight<T>::choose(DenseProduct product, Index n) const {
  const DenseKernel kernel =
      detail::choose_dense_kernel(kernel_, product, weight_.rows(), weight_.cols(), n, sizeof(T))
          .kernel;
  log_.last[int(product)].store((std::uint64_t(n) << 3) | std::uint64_t(int(kernel) + 1),
                                std::memory_order_relaxed);
  return kernel;
}

}  // namespace lora
