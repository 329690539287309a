// OneDnnFrozenWeight: an fp32 frozen weight whose products run on oneDNN's matmul primitive.
// Same seam as DenseFrozenWeight<float> (see dense_frozen_weight.hpp): use it as
//   lora::LoRALinear<float, lora::onednn::OneDnnFrozenWeight>
// Storage and merge are DenseFrozenWeight's own (a plain column-major Eigen matrix, which oneDNN
// reads through strides); only the products change. Include explicitly and link lora::onednn.
#pragma once

#include "lora/config.hpp"
#include "lora/dense_frozen_weight.hpp"
#include "lora/onednn/matmul.hpp"

#include <Eigen/Core>

#include <memory>
#include <string>
#include <utility>

namespace lora::onednn {

class OneDnnFrozenWeight {
 public:
  using Scalar = float;
  using Matrix = Eigen::MatrixXf;
  using Index = Eigen::Index;

  /// Takes W0 (out x in); pass an rvalue to move it in.
  explicit OneDnnFrozenWeight(Matrix W0, MergeMode mode = MergeMode::InPlace)
      : dense_(std::move(W0), mode), cache_(std::make_unique<MatmulCache>()) {}

  // A copy shares no primitives: each copy builds its own cache on first use.
  OneDnnFrozenWeight(const OneDnnFrozenWeight& o)
      : dense_(o.dense_), cache_(std::make_unique<MatmulCache>()) {}
  OneDnnFrozenWeight& operator=(const OneDnnFrozenWeight& o) {
    if (this != &o) {
      dense_ = o.dense_;
      cache_ = std::make_unique<MatmulCache>();
    }
    return *this;
  }
  OneDnnFrozenWeight(OneDnnFrozenWeight&&) noexcept = default;
  OneDnnFrozenWeight& operator=(OneDnnFrozenWeight&&) noexcept = default;

  Index out_features() const { return dense_.out_features(); }
  Index in_features() const { return dense_.in_features(); }
  MergeMode merge_mode() const { return dense_.merge_mode(); }
  bool is_merged() const { return dense_.is_merged(); }
  const Matrix& weight() const { return dense_.weight(); }

  /// H = W * X.   X: k x n,  H: d x n.
  void multiply(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H) const {
    product(X, H, false);
  }
  /// H += W * X.
  void multiply_add(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H) const {
    product(X, H, true);
  }
  /// dX = W^T * G.   G: d x n,  dX: k x n.
  void multiply_transposed(const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX) const {
    transposed_product(G, dX, false);
  }
  /// dX += W^T * G.
  void multiply_transposed_add(const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX) const {
    transposed_product(G, dX, true);
  }

  void merge(float s, const Eigen::Ref<const Matrix>& B, const Eigen::Ref<const Matrix>& A) {
    dense_.merge(s, B, A);
  }
  void unmerge(float s, const Eigen::Ref<const Matrix>& B, const Eigen::Ref<const Matrix>& A) {
    dense_.unmerge(s, B, A);
  }

  /// What oneDNN runs on this CPU.
  static std::string backend_report() { return runtime_report(); }

 private:
  void product(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H, bool accumulate) const {
    if (X.cols() == 0) return;
    const Matrix& W = dense_.weight();
    cache_->run(product_shape(W.rows(), W.cols(), X.cols(), X.outerStride(), H.outerStride(),
                              dt::f32, accumulate),
                X.data(), W.data(), H.data());
  }

  void transposed_product(const Eigen::Ref<const Matrix>& G, Eigen::Ref<Matrix> dX,
                          bool accumulate) const {
    if (G.cols() == 0) return;
    const Matrix& W = dense_.weight();
    cache_->run(transposed_product_shape(W.rows(), W.cols(), G.cols(), G.outerStride(),
                                         dX.outerStride(), dt::f32, accumulate),
                G.data(), W.data(), dX.data());
  }

  DenseFrozenWeight<float> dense_;
  std::unique_ptr<MatmulCache> cache_;  // primitives per shape; mutable state behind a mutex
};

}  // namespace lora::onednn
