// A small multi-layer perceptron for the digits demo, generic over its linear layer: a plain
// trainable DenseLinear (for pre-training and full fine-tuning) or lora::LoRALinear<T, Frozen>
// (any frozen storage). ReLU between layers, softmax cross-entropy on the logits.
#pragma once

#include <lora/core.hpp>
#include <lora/optim.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace digits {

/// A fully trainable linear layer H = W X + b (W: d x k, b: d), with the same calling convention
/// as lora::LoRALinear so that Mlp can hold either.
template <typename T>
class DenseLinear {
 public:
  using Scalar = T;
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

  DenseLinear(Matrix W, Vector b)
      : W_(std::move(W)),
        b_(std::move(b)),
        gW_(Matrix::Zero(W_.rows(), W_.cols())),
        gb_(Vector::Zero(b_.size())) {}

  /// PyTorch's nn.Linear initialisation: W and b ~ U(-1/sqrt(k), 1/sqrt(k)).
  static DenseLinear init(Eigen::Index out, Eigen::Index in, lora::Rng& rng) {
    Matrix W(out, in);
    Vector b(out);
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    lora::fill_uniform(W, rng, -bound, bound);
    lora::fill_uniform(b, rng, -bound, bound);
    return DenseLinear(std::move(W), std::move(b));
  }

  Eigen::Index out_features() const { return W_.rows(); }
  Eigen::Index in_features() const { return W_.cols(); }
  const Matrix& weight() const { return W_; }
  const Vector& bias() const { return b_; }
  Eigen::Index parameter_count() const { return W_.size() + b_.size(); }

  /// H = W X + b.   X: k x n,  H: d x n.
  void forward(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H, lora::Workspace<T>&) const {
    H.noalias() = W_ * X;  // (d x k)(k x n)
    H.colwise() += b_;
  }
  /// dW += G X^T, db += G 1, dX = W^T G.
  void backward(const Eigen::Ref<const Matrix>& X, const Eigen::Ref<const Matrix>& G,
                Eigen::Ref<Matrix> dX, lora::Workspace<T>& ws) {
    backward_without_input_grad(X, G, ws);
    dX.noalias() = W_.transpose() * G;  // (k x d)(d x n)
  }
  void backward_without_input_grad(const Eigen::Ref<const Matrix>& X,
                                   const Eigen::Ref<const Matrix>& G, lora::Workspace<T>&) {
    gW_.noalias() += G * X.transpose();  // (d x n)(n x k)
    gb_ += G.rowwise().sum();
  }
  void zero_grad() {
    gW_.setZero();
    gb_.setZero();
  }
  void train(bool = true) {}
  void eval() {}

  std::vector<lora::ParameterView<T>> parameters() {
    return {lora::make_parameter(W_, gW_), lora::make_parameter(b_, gb_)};
  }

 private:
  Matrix W_;
  Vector b_;
  Matrix gW_;
  Vector gb_;
};

// What an Mlp trains, and its forward with the adapter switched off, for each kind of layer.
template <typename T>
std::vector<lora::ParameterView<T>> trainable_parameters(DenseLinear<T>& layer) {
  return layer.parameters();
}
template <typename T, typename F>
std::vector<lora::ParameterView<T>> trainable_parameters(lora::LoRALinear<T, F>& layer) {
  return lora::adapter_parameters(layer);  // A and B only: W0 and the bias stay frozen
}
template <typename T>
Eigen::Index trainable_count(const DenseLinear<T>& layer) {
  return layer.parameter_count();
}
template <typename T, typename F>
Eigen::Index trainable_count(const lora::LoRALinear<T, F>& layer) {
  return layer.trainable_parameter_count();
}
template <typename T>
void forward_without_adapter(const DenseLinear<T>& layer,
                             const Eigen::Ref<const typename DenseLinear<T>::Matrix>& X,
                             Eigen::Ref<typename DenseLinear<T>::Matrix> H,
                             lora::Workspace<T>& ws) {
  layer.forward(X, H, ws);
}
/// The base model's layer: H = W0 X + b, through the frozen storage itself (no adapter term).
template <typename T, typename F>
void forward_without_adapter(const lora::LoRALinear<T, F>& layer,
                             const Eigen::Ref<const typename lora::LoRALinear<T, F>::Matrix>& X,
                             Eigen::Ref<typename lora::LoRALinear<T, F>::Matrix> H,
                             lora::Workspace<T>&) {
  layer.frozen().multiply(X, H);
  if (layer.has_bias()) H.colwise() += layer.bias();
}

/// Mean softmax cross-entropy of logits Z (c x n) against labels, and G = dL/dZ = (softmax -
/// onehot)/n.
template <typename T>
double softmax_cross_entropy(const Eigen::Ref<const Eigen::Matrix<T, -1, -1>>& Z, const int* labels,
                             Eigen::Ref<Eigen::Matrix<T, -1, -1>> G) {
  double loss = 0;
  const T inv_n = T(1) / static_cast<T>(Z.cols());
  for (Eigen::Index j = 0; j < Z.cols(); ++j) {
    const T m = Z.col(j).maxCoeff();  // subtracted for a stable exp
    G.col(j) = (Z.col(j).array() - m).exp();
    const T sum = G.col(j).sum();
    loss += std::log(static_cast<double>(sum)) - static_cast<double>(Z(labels[j], j) - m);
    G.col(j) *= inv_n / sum;
    G(labels[j], j) -= inv_n;
  }
  return loss / static_cast<double>(Z.cols());
}

/// Number of columns of Z whose largest entry is at the label.
template <typename Derived>
int count_correct(const Eigen::MatrixBase<Derived>& Z, const std::vector<int>& labels) {
  int correct = 0;
  for (Eigen::Index j = 0; j < Z.cols(); ++j) {
    Eigen::Index arg = 0;
    Z.col(j).maxCoeff(&arg);
    correct += arg == labels[std::size_t(j)];
  }
  return correct;
}

/// Linear -> ReLU -> ... -> Linear, over any layer type with forward/backward as LoRALinear's.
template <typename Layer>
class Mlp {
 public:
  using T = typename Layer::Scalar;
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

  explicit Mlp(std::vector<Layer> layers) : layers_(std::move(layers)), Z_(layers_.size()) {}

  std::vector<Layer>& layers() { return layers_; }
  const std::vector<Layer>& layers() const { return layers_; }

  /// Views of everything that trains (the storage lives in the layers: do not copy or move the
  /// Mlp while an optimizer holds them).
  std::vector<lora::ParameterView<T>> parameters() {
    std::vector<lora::ParameterView<T>> all;
    for (auto& l : layers_)
      for (auto& p : trainable_parameters(l)) all.push_back(p);
    return all;
  }
  Eigen::Index trainable_parameter_count() const {
    Eigen::Index n = 0;
    for (const auto& l : layers_) n += trainable_count(l);
    return n;
  }

  void train(bool on = true) {
    for (auto& l : layers_) l.train(on);
  }
  void eval() { train(false); }

  /// One training step's forward and backward on a batch (X: features x n); accumulates the
  /// gradients and returns the mean loss. Logits stay in logits() for accuracy counting.
  double forward_backward(const Eigen::Ref<const Matrix>& X, const int* labels) {
    const Eigen::Index n = X.cols(), L = Eigen::Index(layers_.size());
    for (Eigen::Index i = 0; i < L; ++i) {
      Matrix& Z = Z_[i];
      Z.resize(layers_[i].out_features(), n);  // no-op once the batch size is steady
      if (i == 0) {
        layers_[0].forward(X, Z, ws_);
      } else {
        layers_[i].forward(Z_[i - 1], Z, ws_);
      }
      if (i + 1 < L) Z = Z.cwiseMax(T(0));  // ReLU in place: Z holds the activation
    }
    G_.resize(Z_[L - 1].rows(), n);
    const double loss = softmax_cross_entropy<T>(Z_[L - 1], labels, G_);
    for (Eigen::Index i = L - 1; i >= 1; --i) {
      dA_.resize(Z_[i - 1].rows(), n);
      layers_[i].backward(Z_[i - 1], G_, dA_, ws_);
      // Through the ReLU: the activation is positive exactly where the pre-activation was.
      G_ = dA_.cwiseProduct((Z_[i - 1].array() > T(0)).matrix().template cast<T>());
    }
    layers_[0].backward_without_input_grad(X, G_, ws_);
    return loss;
  }
  const Matrix& logits() const { return Z_.back(); }

  /// Logits (classes x n) for X, with the adapter (use eval() first if the layers drop out).
  Matrix predict(const Eigen::Ref<const Matrix>& X, bool with_adapter = true) const {
    lora::Workspace<T> ws;
    Matrix in = X, out;
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      out.resize(layers_[i].out_features(), X.cols());
      if (with_adapter) {
        layers_[i].forward(in, out, ws);
      } else {
        forward_without_adapter(layers_[i], in, out, ws);
      }
      if (i + 1 < layers_.size()) out = out.cwiseMax(T(0));
      std::swap(in, out);
    }
    return in;
  }

 private:
  std::vector<Layer> layers_;
  std::vector<Matrix> Z_;
  Matrix G_, dA_;
  lora::Workspace<T> ws_;
};

/// The upstream model of the digits examples: MLP 64-128-128-10 of trainable dense layers, drawn
/// from `seed`.
inline Mlp<DenseLinear<float>> make_base_mlp(std::uint64_t seed = 7) {
  lora::Rng rng(seed);
  std::vector<DenseLinear<float>> layers;
  layers.push_back(DenseLinear<float>::init(128, 64, rng));
  layers.push_back(DenseLinear<float>::init(128, 128, rng));
  layers.push_back(DenseLinear<float>::init(10, 128, rng));
  return Mlp<DenseLinear<float>>(std::move(layers));
}

/// `base` with every layer frozen (W0 and b copied in) under a LoRA adapter of rank min(r, d, k):
/// alpha = 2 r (s = 2 at every rank), A initialised as `init` says (Kaiming-uniform by default;
/// PiSSA, OLoRA and LoftQ factor the fp32 W0 and leave the residual in the storage), layer i
/// seeded with first_seed + i.
template <typename Frozen = lora::DenseFrozenWeight<float>>
Mlp<lora::LoRALinear<float, Frozen>> make_lora_mlp(const Mlp<DenseLinear<float>>& base, int r,
                                                   std::uint64_t first_seed, double dropout = 0,
                                                   bool dora = false,
                                                   lora::Init init = lora::Init::KaimingUniform,
                                                   int svd_iterations = 0) {
  std::vector<lora::LoRALinear<float, Frozen>> layers;
  layers.reserve(base.layers().size());
  std::uint64_t seed = first_seed;
  for (const auto& l : base.layers()) {
    lora::LoRAConfig cfg;
    cfg.rank = int(std::min<Eigen::Index>({r, l.out_features(), l.in_features()}));
    cfg.alpha = 2.0 * cfg.rank;
    cfg.init = init;
    cfg.svd_iterations = svd_iterations;  // PiSSA: 0 exact SVD, N randomized (pissa_niter_N)
    cfg.dropout = dropout;
    cfg.use_dora = dora;  // DoRA: a learned magnitude per output beside A and B
    cfg.seed = seed++;
    // The storage built with its own default merge mode (the NF4 base supports only one).
    if (lora::changes_base(init))
      layers.emplace_back(Frozen(l.weight()), l.bias(), cfg, l.weight());
    else
      layers.emplace_back(Frozen(l.weight()), l.bias(), cfg);
  }
  return Mlp<lora::LoRALinear<float, Frozen>>(std::move(layers));
}

}  // namespace digits
