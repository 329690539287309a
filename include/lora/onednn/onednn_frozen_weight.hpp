// OneDnnFrozenWeight: an fp32 frozen weight whose products run on oneDNN's matmul primitive.
// Keeps the frozen-storage contract (frozen_storage.hpp) as DenseFrozenWeight<float> does: use it
// as
//   lora::LoRALinear<float, lora::onednn::OneDnnFrozenWeight>
// Storage and merge are DenseFrozenWeight's own (a plain column-major Eigen matrix); only the
// products change. Include explicitly and link lora::onednn.
// By default (WeightLayout::Prepacked) oneDNN multiplies a copy of W in the layout it prefers on
// this CPU, made at the first product and again at the first product after each merge and
// unmerge: one fp32 copy of W per orientation used (W X; W^T G once the layer trains). It is
// faster than reading the stored weight through strides (WeightLayout::Strided, no copy) at every
// batch size measured on a Zen 4, by far at small batches (docs/performance.md).
#pragma once

#include "lora/dense_frozen_weight.hpp"
#include "lora/detail/frozen_storage_base.hpp"
#include "lora/onednn/matmul.hpp"

#include <Eigen/Core>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

namespace lora::onednn {

/// An fp32 frozen weight W0 (d x k) whose products run on oneDNN's matmul; storage and merge are
/// DenseFrozenWeight<float>'s.
class OneDnnFrozenWeight : public lora::detail::FrozenStorageBase<OneDnnFrozenWeight, float> {
 public:
  /// Takes W0 (out x in); pass an rvalue to move it in.
  explicit OneDnnFrozenWeight(Matrix W0, MergeMode mode = MergeMode::InPlace,
                              WeightLayout layout = WeightLayout::Prepacked)
      : dense_(std::move(W0), mode), layout_(layout) {
    cache_.create();
  }

  /// d, the rows of W0 (output features).
  Index out_features() const { return dense_.out_features(); }
  /// k, the columns of W0 (input features).
  Index in_features() const { return dense_.in_features(); }
  /// How unmerge() restores W0, chosen at construction.
  MergeMode merge_mode() const { return dense_.merge_mode(); }
  /// True while a delta is merged into the weight.
  bool is_merged() const { return dense_.is_merged(); }
  /// oneDNN's execute() makes a few small allocations of its own per call.
  bool allocation_free() const { return false; }
  /// The weight in use, by reference: no copy.
  const Matrix& matrix() const { return dense_.matrix(); }
  /// The weight in use as a new matrix.
  Matrix weight() const { return dense_.weight(); }
  /// True when the weight in use holds no NaN or infinity.
  bool all_finite() const { return dense_.all_finite(); }
  /// The row norms of W0, in double (see DenseFrozenWeight::row_norms).
  void row_norms(Eigen::Ref<Eigen::VectorXd> out) const { dense_.row_norms(out); }
  /// The weight, any merged copy, and the prepacked copies (WeightLayout::Prepacked).
  std::size_t stored_bytes() const { return dense_.stored_bytes() + cache_->packed_bytes(); }
  /// How the weight is handed to oneDNN (chosen at construction).
  WeightLayout weight_layout() const { return layout_; }
  /// One line per product run so far: its shape, layout and oneDNN's implementation string.
  std::string product_report() const {
    std::string out;
    for (const std::string& line : cache_->report()) out += line + "\n";
    return out;
  }

  /// As DenseFrozenWeight<float>::merge: W = diag(g)(W0 + s B A), refused when not finite.
  void merge(float s, const Eigen::Ref<const Matrix>& B, const Eigen::Ref<const Matrix>& A,
             const Eigen::Ref<const Vector>& g) {
    dense_.merge(s, B, A, g);
    ++version_;  // a prepacked copy is remade at the next product
  }
  /// Back to W0 (see DenseFrozenWeight::unmerge).
  void unmerge(float s, const Eigen::Ref<const Matrix>& B, const Eigen::Ref<const Matrix>& A,
               const Eigen::Ref<const Vector>& g) {
    dense_.unmerge(s, B, A, g);
    ++version_;
  }

  /// W0 = W (see DenseFrozenWeight::rebase); prepacked copies are remade at the next product.
  void rebase(const Eigen::Ref<const Matrix>& W) {
    dense_.rebase(W);
    ++version_;
  }

  /// What oneDNN runs on this CPU.
  static std::string backend_report() { return runtime_report(); }

 private:
  friend class lora::detail::FrozenStorageBase<OneDnnFrozenWeight, float>;  // calls product()

  void product(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H, bool accumulate) const {
    if (X.cols() == 0) return;
    const Matrix& W = dense_.matrix();
    cache_->run(product_shape(W.rows(), W.cols(), X.cols(), X.outerStride(), H.outerStride(),
                              dt::f32, accumulate, layout_ == WeightLayout::Prepacked),
                X.data(), W.data(), H.data(), version_);
  }

  void transposed_product(const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX,
                          bool accumulate) const {
    if (G.cols() == 0) return;
    const Matrix& W = dense_.matrix();
    cache_->run(
        transposed_product_shape(W.rows(), W.cols(), G.cols(), G.outerStride(), dX.outerStride(),
                                 dt::f32, accumulate, layout_ == WeightLayout::Prepacked),
        G.data(), W.data(), dX.data(), version_);
  }

  DenseFrozenWeight<float> dense_;
  // Primitives per shape and prepacked weights (mutable state behind a mutex); a copy builds
  // its own on first use.
  lora::detail::FreshOnCopy<MatmulCache> cache_;
  WeightLayout layout_;
  std::uint64_t version_ = 0;  // bumped when W changes (merge, unmerge): prepacked copies follow
};

}  // namespace lora::onednn
