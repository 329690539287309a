// A small self-attention sequence classifier whose four attention projections (W_q, W_k, W_v,
// W_o) can each be dense-trainable (pretraining, full fine-tuning), frozen, or a frozen weight
// with a LoRA adapter (lora::LoRALinear). Forward and backward are written out by hand.
//
//   tokens (L per sequence) -> X0 = E[:, token] + P[:, position]              d x (L n)
//   each block:  Q = Wq X, K = Wk X, V = Wv X                                  d x (L n)
//                per sequence and head h (rows h dh .. h dh + dh - 1):
//                  S = Kh^T Qh / sqrt(dh)        (L x L; column i holds query i's scores)
//                  P = softmax of each column of S
//                  Ch = Vh P                     (dh x L; column i = sum_j P(j, i) v_j)
//                X <- X + Wo C                                                 (residual)
//   pooled = X[:, first position] (Pooling::First, a CLS token) or the mean over positions
//   logits = Wh pooled + bh;  loss = mean cross-entropy
//
// Backward of the attention, per sequence and head (G = dL/dC_h):
//   dV = G P^T,   dP = V^T G,   dS = P .* (dP - 1 (sum_j P .* dP)),   (column-wise softmax)
//   dQ = K dS / sqrt(dh),   dK = Q dS^T / sqrt(dh).
#pragma once

#include <lora/core.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace attention {

/// One projection without bias, d_out x d_in, in one of three modes: dense and trainable, dense
/// and frozen, or frozen with a LoRA adapter (only A and B train).
template <typename T>
class Projection {
 public:
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

  explicit Projection(Matrix W) : W_(std::move(W)) { grad_W_.setZero(W_.rows(), W_.cols()); }

  /// Dense mode: W trains (true) or stays frozen (false). Throws once adapted.
  void set_trainable(bool trainable) {
    if (lora_) throw std::logic_error("Projection::set_trainable: the projection is LoRA-adapted");
    trainable_ = trainable;
  }
  bool trainable() const { return trainable_ && !lora_; }

  /// Freezes W and wraps it in a LoRALinear with a fresh adapter (B = 0: outputs are unchanged).
  void adapt(const lora::LoRAConfig& config) {
    if (lora_) throw std::logic_error("Projection::adapt: the projection is already adapted");
    lora_.emplace(std::move(W_), config);
    W_.resize(0, 0);
    grad_W_.resize(0, 0);
    trainable_ = false;
  }
  bool adapted() const { return lora_.has_value(); }
  lora::LoRALinear<T>& lora() { return *lora_; }
  const lora::LoRALinear<T>& lora() const { return *lora_; }

  /// The frozen or dense weight (d_out x d_in): W, or the adapted layer's W0.
  const Matrix& weight() const { return lora_ ? lora_->frozen().matrix() : W_; }
  Matrix& dense_weight() { return W_; }  ///< dense mode only
  Matrix& dense_grad() { return grad_W_; }
  Eigen::Index rows() const { return weight().rows(); }
  Eigen::Index cols() const { return weight().cols(); }

  /// H = W X (+ s B A X when adapted).   X: d_in x N,  H: d_out x N.
  void forward(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H,
               lora::Workspace<T>& ws) const {
    if (lora_) {
      lora_->forward(X, H, ws);
    } else {
      H.noalias() = W_ * X;  // (d_out x d_in)(d_in x N)
    }
  }

  /// Accumulates the gradients of whatever trains for G = dL/dH (d_out x N) and, when dX is given,
  /// writes dL/dX (d_in x N) into it.
  void backward(const Eigen::Ref<const Matrix>& X, const Eigen::Ref<const Matrix>& G, Matrix* dX,
                lora::Workspace<T>& ws) {
    if (lora_) {
      if (dX) {
        dX->resize(X.rows(), X.cols());
        lora_->backward(X, G, *dX, ws);
      } else {
        lora_->backward_without_input_grad(X, G, ws);
      }
      return;
    }
    if (trainable_) grad_W_.noalias() += G * X.transpose();  // (d_out x N)(N x d_in)
    if (dX) dX->noalias() = W_.transpose() * G;              // (d_in x d_out)(d_out x N)
  }

  void zero_grad() {
    if (lora_) {
      lora_->zero_grad();
    } else {
      grad_W_.setZero();
    }
  }

  /// Numbers that train: r (d_out + d_in) when adapted, d_out d_in when dense-trainable, else 0.
  Eigen::Index trainable_parameter_count() const {
    if (lora_) return lora_->trainable_parameter_count();
    return trainable_ ? W_.size() : 0;
  }

 private:
  Matrix W_, grad_W_;
  bool trainable_ = true;
  std::optional<lora::LoRALinear<T>> lora_;
};

/// Which projection of a block: the paper's W_q, W_k, W_v, W_o.
enum class Which { Q = 0, K = 1, V = 2, O = 3 };
inline const char* name(Which w) {
  static const char* names[] = {"Wq", "Wk", "Wv", "Wo"};
  return names[static_cast<int>(w)];
}

/// One multi-head self-attention block with a residual connection: X <- X + Wo Attn(X).
template <typename T>
struct AttentionBlock {
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

  AttentionBlock(Matrix Wq, Matrix Wk, Matrix Wv, Matrix Wo)
      : proj{Projection<T>(std::move(Wq)), Projection<T>(std::move(Wk)),
             Projection<T>(std::move(Wv)), Projection<T>(std::move(Wo))} {}

  Projection<T>& operator[](Which w) { return proj[static_cast<int>(w)]; }
  const Projection<T>& operator[](Which w) const { return proj[static_cast<int>(w)]; }

  Projection<T> proj[4];
  // Activations of the last forward, kept for backward.
  Matrix X, Q, K, V, C, P;  // X, Q, K, V, C: d x N;  P: L x (heads N) (one L x L per seq, head)
};

/// How the last block's columns are reduced to one vector per sequence.
enum class Pooling {
  First,  ///< the first position (a CLS token)
  Mean,   ///< the mean over positions
};

struct ModelConfig {
  int vocab = 25;    ///< number of token ids
  int seq_len = 13;  ///< L: positions per sequence (all sequences have the same length)
  int d_model = 64;  ///< d
  int heads = 1;     ///< d_model must be a multiple of heads
  int layers = 1;    ///< attention blocks
  int classes = 8;   ///< C
  Pooling pooling = Pooling::First;
};

/// A batch: n sequences of seq_len tokens each (sequence s at tokens[s L .. s L + L - 1]) and
/// one label in [0, classes) per sequence.
struct Batch {
  std::vector<int> tokens;
  std::vector<int> labels;
  int size() const { return static_cast<int>(labels.size()); }
};

/// The whole classifier. Copyable: copy a pretrained model, then adapt the copy.
template <typename T>
class AttentionModel {
 public:
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

  /// Random initialisation from rng: embeddings N(0, 1), projections N(0, 1/d), head N(0, 1/d).
  AttentionModel(const ModelConfig& config, lora::Rng& rng) : cfg_(config) {
    if (cfg_.d_model < 1 || cfg_.heads < 1 || cfg_.d_model % cfg_.heads != 0)
      throw std::invalid_argument("AttentionModel: d_model must be a positive multiple of heads");
    if (cfg_.vocab < 1 || cfg_.seq_len < 1 || cfg_.layers < 1 || cfg_.classes < 2)
      throw std::invalid_argument("AttentionModel: vocab, seq_len, layers >= 1, classes >= 2");
    const int d = cfg_.d_model;
    const double s = 1.0 / std::sqrt(static_cast<double>(d));
    token_embedding_.resize(d, cfg_.vocab);
    position_embedding_.resize(d, cfg_.seq_len);
    lora::fill_normal(token_embedding_, rng, 0.0, 1.0);
    lora::fill_normal(position_embedding_, rng, 0.0, 1.0);
    for (int l = 0; l < cfg_.layers; ++l) {
      Matrix W[4];
      for (auto& w : W) {
        w.resize(d, d);
        lora::fill_normal(w, rng, 0.0, s);
      }
      blocks_.emplace_back(W[0], W[1], W[2], W[3]);
    }
    head_W_.resize(cfg_.classes, d);
    lora::fill_normal(head_W_, rng, 0.0, s);
    head_b_.setZero(cfg_.classes);
    grad_token_embedding_.setZero(d, cfg_.vocab);
    grad_position_embedding_.setZero(d, cfg_.seq_len);
    grad_head_W_.setZero(cfg_.classes, d);
    grad_head_b_.setZero(cfg_.classes);
  }

  const ModelConfig& config() const { return cfg_; }
  int layers() const { return cfg_.layers; }
  AttentionBlock<T>& block(int l) { return blocks_.at(l); }
  const AttentionBlock<T>& block(int l) const { return blocks_.at(l); }

  Matrix& token_embedding() { return token_embedding_; }        ///< d x vocab
  Matrix& position_embedding() { return position_embedding_; }  ///< d x L
  Matrix& head_weight() { return head_W_; }                     ///< C x d
  Vector& head_bias() { return head_b_; }                       ///< C
  Matrix& grad_token_embedding() { return grad_token_embedding_; }
  Matrix& grad_position_embedding() { return grad_position_embedding_; }
  Matrix& grad_head_weight() { return grad_head_W_; }
  Vector& grad_head_bias() { return grad_head_b_; }

  /// Embeddings and head train (true) or stay frozen (false).
  void set_embeddings_trainable(bool on) { train_embeddings_ = on; }
  void set_head_trainable(bool on) { train_head_ = on; }
  bool embeddings_trainable() const { return train_embeddings_; }
  bool head_trainable() const { return train_head_; }

  /// Every dense projection trains (true) or is frozen (false); adapted ones are left alone.
  void set_projections_trainable(bool on) {
    for (auto& b : blocks_)
      for (auto& p : b.proj)
        if (!p.adapted()) p.set_trainable(on);
  }

  /// Freezes everything, then gives the chosen projections of every block a LoRA adapter.
  /// Adapter seeds differ per block and projection (config.seed + 4 l + which).
  void adapt(const std::vector<Which>& which, lora::LoRAConfig config) {
    set_embeddings_trainable(false);
    set_head_trainable(false);
    set_projections_trainable(false);
    const auto base_seed = config.seed;
    for (int l = 0; l < cfg_.layers; ++l)
      for (Which w : which) {
        config.seed = base_seed + 4 * static_cast<std::uint64_t>(l) + static_cast<int>(w);
        blocks_[l][w].adapt(config);
      }
  }

  /// Numbers that train in the current setting.
  Eigen::Index trainable_parameter_count() const {
    Eigen::Index n = 0;
    if (train_embeddings_) n += token_embedding_.size() + position_embedding_.size();
    if (train_head_) n += head_W_.size() + head_b_.size();
    for (const auto& b : blocks_)
      for (const auto& p : b.proj) n += p.trainable_parameter_count();
    return n;
  }

  /// Views of everything that trains now, for an optimizer (lora/optim.hpp). They point into
  /// this model: don't copy, move or re-adapt the model while an optimizer holds them.
  std::vector<lora::ParameterView<T>> trainable_parameters() {
    std::vector<lora::ParameterView<T>> params;
    if (train_embeddings_) {
      params.push_back(lora::make_parameter(token_embedding_, grad_token_embedding_));
      params.push_back(lora::make_parameter(position_embedding_, grad_position_embedding_));
    }
    if (train_head_) {
      params.push_back(lora::make_parameter(head_W_, grad_head_W_));
      params.push_back(lora::make_parameter(head_b_, grad_head_b_));
    }
    for (auto& b : blocks_)
      for (auto& p : b.proj) {
        if (p.adapted()) {
          for (auto& view : lora::adapter_parameters(p.lora())) params.push_back(view);
        } else if (p.trainable()) {
          params.push_back(lora::make_parameter(p.dense_weight(), p.dense_grad()));
        }
      }
    return params;
  }

  void zero_grad() {
    grad_token_embedding_.setZero();
    grad_position_embedding_.setZero();
    grad_head_W_.setZero();
    grad_head_b_.setZero();
    for (auto& b : blocks_)
      for (auto& p : b.proj) p.zero_grad();
  }

  /// Logits (C x n) for a batch; keeps the activations for backward().
  const Matrix& forward(const Batch& batch) {
    const int L = cfg_.seq_len, n = batch.size();
    if (static_cast<int>(batch.tokens.size()) != L * n)
      throw std::invalid_argument("AttentionModel::forward: expected " + std::to_string(L * n) +
                                  " tokens (seq_len x sequences), got " +
                                  std::to_string(batch.tokens.size()));
    n_ = n;
    X0_.resize(cfg_.d_model, L * n);
    for (int s = 0; s < n; ++s)
      for (int t = 0; t < L; ++t) {
        const int tok = batch.tokens[s * L + t];
        if (tok < 0 || tok >= cfg_.vocab)
          throw std::invalid_argument("AttentionModel::forward: token id " + std::to_string(tok) +
                                      " is outside [0, " + std::to_string(cfg_.vocab) + ")");
        X0_.col(s * L + t) = token_embedding_.col(tok) + position_embedding_.col(t);
      }
    // Block l keeps a copy of its input in blocks_[l].X and writes its output to XL_.
    for (int l = 0; l < cfg_.layers; ++l) block_forward(blocks_[l], l == 0 ? X0_ : XL_);
    pool(XL_, pooled_);
    logits_.noalias() = head_W_ * pooled_;  // (C x d)(d x n)
    logits_.colwise() += head_b_;
    return logits_;
  }

  /// Mean cross-entropy of the last forward's logits against the labels, and dL/dlogits into
  /// the internal buffer used by backward().
  T loss(const Batch& batch) {
    const int n = batch.size();
    dlogits_.resize(logits_.rows(), n);
    T total = 0;
    for (int s = 0; s < n; ++s) {
      const int y = batch.labels[s];
      if (y < 0 || y >= cfg_.classes)
        throw std::invalid_argument("AttentionModel::loss: label " + std::to_string(y) +
                                    " is outside [0, " + std::to_string(cfg_.classes) + ")");
      const T m = logits_.col(s).maxCoeff();
      dlogits_.col(s) = (logits_.col(s).array() - m).exp().matrix();
      const T z = dlogits_.col(s).sum();
      total += std::log(z) + m - logits_(y, s);
      dlogits_.col(s) /= z;  // softmax
      dlogits_(y, s) -= 1;   // d(-log p_y)/dlogits = p - onehot(y)
    }
    dlogits_ /= static_cast<T>(n);
    return total / static_cast<T>(n);
  }

  /// forward + loss + backward: accumulates the gradients of everything that trains.
  T loss_and_backward(const Batch& batch) {
    forward(batch);
    const T l = loss(batch);
    backward(batch);
    return l;
  }

  /// Backward of the last forward + loss(): accumulates into the gradients of what trains.
  void backward(const Batch& batch) {
    const int L = cfg_.seq_len, n = n_;
    if (train_head_) {
      grad_head_W_.noalias() += dlogits_ * pooled_.transpose();  // (C x n)(n x d)
      grad_head_b_ += dlogits_.rowwise().sum();
    }
    dpooled_.noalias() = head_W_.transpose() * dlogits_;  // (d x C)(C x n)
    dX_.setZero(cfg_.d_model, L * n);
    for (int s = 0; s < n; ++s) {
      if (cfg_.pooling == Pooling::First) {
        dX_.col(s * L) = dpooled_.col(s);
      } else {
        dX_.middleCols(s * L, L).colwise() = dpooled_.col(s) / static_cast<T>(L);
      }
    }
    for (int l = cfg_.layers - 1; l >= 0; --l) {
      const bool need_input_grad = l > 0 || train_embeddings_;
      block_backward(blocks_[l], dX_, need_input_grad);
      if (!need_input_grad) return;
    }
    for (int s = 0; s < n; ++s)
      for (int t = 0; t < L; ++t) {
        grad_token_embedding_.col(batch.tokens[s * L + t]) += dX_.col(s * L + t);
        grad_position_embedding_.col(t) += dX_.col(s * L + t);
      }
  }

  /// Predicted class of each sequence (argmax of the logits), in batches of `chunk` sequences.
  std::vector<int> predict(const Batch& batch, int chunk = 256) {
    std::vector<int> out;
    out.reserve(batch.size());
    const int L = cfg_.seq_len;
    Batch part;
    for (int begin = 0; begin < batch.size(); begin += chunk) {
      const int end = std::min(batch.size(), begin + chunk);
      part.tokens.assign(batch.tokens.begin() + begin * L, batch.tokens.begin() + end * L);
      part.labels.assign(batch.labels.begin() + begin, batch.labels.begin() + end);
      const Matrix& logits = forward(part);
      for (int s = 0; s < end - begin; ++s) {
        Eigen::Index arg;
        logits.col(s).maxCoeff(&arg);
        out.push_back(static_cast<int>(arg));
      }
    }
    return out;
  }

  /// Fraction of sequences whose predicted class equals the label.
  double accuracy(const Batch& batch) {
    const auto pred = predict(batch);
    int right = 0;
    for (int s = 0; s < batch.size(); ++s) right += pred[s] == batch.labels[s];
    return batch.size() ? static_cast<double>(right) / batch.size() : 0.0;
  }

 private:
  // Runs one block on input X (copied into b.X); the output goes to XL_ (the next block's input).
  void block_forward(AttentionBlock<T>& b, const Matrix& X) {
    const int L = cfg_.seq_len, H = cfg_.heads, dh = cfg_.d_model / cfg_.heads;
    const Eigen::Index N = X.cols();
    b.X = X;
    b.Q.resize(cfg_.d_model, N);
    b.K.resize(cfg_.d_model, N);
    b.V.resize(cfg_.d_model, N);
    b.C.resize(cfg_.d_model, N);
    b.P.resize(L, H * N);
    b[Which::Q].forward(b.X, b.Q, ws_);  // (d x d)(d x N)
    b[Which::K].forward(b.X, b.K, ws_);
    b[Which::V].forward(b.X, b.V, ws_);
    const T c = static_cast<T>(1.0 / std::sqrt(static_cast<double>(dh)));
    for (Eigen::Index s = 0; s < n_; ++s)
      for (int h = 0; h < H; ++h) {
        auto P = b.P.middleCols((s * H + h) * L, L);  // L x L
        const auto Qh = b.Q.block(h * dh, s * L, dh, L);
        const auto Kh = b.K.block(h * dh, s * L, dh, L);
        P.noalias() = c * Kh.transpose() * Qh;  // (L x dh)(dh x L): P(j, i) = k_j . q_i / sqrt(dh)
        for (int i = 0; i < L; ++i) {           // softmax over keys j, one query i per column
          auto col = P.col(i);
          col = (col.array() - col.maxCoeff()).exp().matrix();
          col /= col.sum();
        }
        b.C.block(h * dh, s * L, dh, L).noalias() = b.V.block(h * dh, s * L, dh, L) * P;
      }
    XL_.resize(cfg_.d_model, N);
    b[Which::O].forward(b.C, XL_, ws_);  // (d x d)(d x N)
    XL_ += b.X;                          // residual
  }

  // dX holds dL/d(block output) on entry and dL/d(block input) on exit (when need_input_grad).
  void block_backward(AttentionBlock<T>& b, Matrix& dX, bool need_input_grad) {
    const int L = cfg_.seq_len, H = cfg_.heads, dh = cfg_.d_model / cfg_.heads;
    const Eigen::Index N = dX.cols();
    b[Which::O].backward(b.C, dX, &dC_, ws_);  // dC = Wo^T dOut (+ LoRA share): d x N
    dQ_.resize(cfg_.d_model, N);
    dK_.resize(cfg_.d_model, N);
    dV_.resize(cfg_.d_model, N);
    dP_.resize(L, L);
    const T c = static_cast<T>(1.0 / std::sqrt(static_cast<double>(dh)));
    for (Eigen::Index s = 0; s < n_; ++s)
      for (int h = 0; h < H; ++h) {
        const auto P = b.P.middleCols((s * H + h) * L, L);                // L x L
        const auto G = dC_.block(h * dh, s * L, dh, L);                   // dh x L
        dV_.block(h * dh, s * L, dh, L).noalias() = G * P.transpose();    // (dh x L)(L x L)
        dP_.noalias() = b.V.block(h * dh, s * L, dh, L).transpose() * G;  // (L x dh)(dh x L)
        // Softmax backward per column: dS = P .* (dP - sum_j P(j, i) dP(j, i)).
        const Eigen::Matrix<T, 1, Eigen::Dynamic> inner =
            P.cwiseProduct(dP_).colwise().sum();                               // 1 x L
        dP_ = (P.array() * (dP_.array().rowwise() - inner.array())).matrix();  // now dS
        dQ_.block(h * dh, s * L, dh, L).noalias() =
            c * b.K.block(h * dh, s * L, dh, L) * dP_;  // (dh x L)(L x L)
        dK_.block(h * dh, s * L, dh, L).noalias() =
            c * b.Q.block(h * dh, s * L, dh, L) * dP_.transpose();
      }
    // dX (block input) = dOut (residual) + Wq^T dQ + Wk^T dK + Wv^T dV.
    Matrix* into = need_input_grad ? &dTmp_ : nullptr;
    b[Which::Q].backward(b.X, dQ_, into, ws_);
    if (need_input_grad) dX += dTmp_;
    b[Which::K].backward(b.X, dK_, into, ws_);
    if (need_input_grad) dX += dTmp_;
    b[Which::V].backward(b.X, dV_, into, ws_);
    if (need_input_grad) dX += dTmp_;
  }

  void pool(const Matrix& X, Matrix& pooled) const {
    const int L = cfg_.seq_len;
    pooled.resize(cfg_.d_model, n_);
    for (Eigen::Index s = 0; s < n_; ++s) {
      if (cfg_.pooling == Pooling::First) {
        pooled.col(s) = X.col(s * L);
      } else {
        pooled.col(s) = X.middleCols(s * L, L).rowwise().mean();
      }
    }
  }

  ModelConfig cfg_;
  Matrix token_embedding_, position_embedding_, head_W_;
  Vector head_b_;
  Matrix grad_token_embedding_, grad_position_embedding_, grad_head_W_;
  Vector grad_head_b_;
  bool train_embeddings_ = true, train_head_ = true;
  std::vector<AttentionBlock<T>> blocks_;
  // Activations and scratch of the last forward/backward.
  Eigen::Index n_ = 0;
  Matrix X0_, XL_, pooled_, logits_, dlogits_, dpooled_, dX_, dC_, dQ_, dK_, dV_, dP_, dTmp_;
  lora::Workspace<T> ws_;
};

}  // namespace attention
