// A llama-family language model (the architecture of llama.cpp's `llama`: RMSNorm, rotary position
// embedding, grouped-query causal attention, SwiGLU) with forward and backward written out, and
// lora's layers on its seven projections. Activations are column-per-token, as everywhere in lora:
// a batch of S sequences of L tokens is E x (S L), sequence s in columns s L .. s L + L - 1.
//
//   x = token_embd[:, token]                                              E x N
//   each block:
//     h = x + W_o Attn(rope(W_q n), rope(W_k n), W_v n),  n = rmsnorm(x) .* attn_norm
//     x = h + W_down (silu(W_gate m) .* (W_up m)),        m = rmsnorm(h) .* ffn_norm
//   logits = W_output (rmsnorm(x) .* output_norm)        (W_output = token_embd^T when tied)
//
// rmsnorm(x) = x / sqrt(mean(x^2) + eps), per column. rope is llama.cpp's "norm" mode: within each
// head, the adjacent pair (x_2i, x_2i+1) of the token at position p is rotated by the angle
// p * base^(-2i / n_rot) — on weights in GGUF's row order (llama.cpp's converter permutes Hugging
// Face's q and k rows into it). Attention of head h reads key/value head h / (n_head / n_head_kv),
// with scores k_j . q_i / sqrt(head_dim) for j <= i (causal).
//
// Backward, per column (g = dL/d(output)):
//   rmsnorm:  y = w .* x r, r = (mean(x^2) + eps)^(-1/2):
//             dw += g .* x r,  dx = r (g .* w) - x r^3 mean((g .* w) .* x)
//   rope:     the inverse rotation (by -angle) of g
//   softmax (per query column): dS = P .* (dP - sum_j(P .* dP))
//   silu(a) = a sigma(a):  silu'(a) = sigma(a) (1 + a (1 - sigma(a)))
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

// The attention loops run over (sequence, head) pairs on OpenMP's threads when it is enabled.
#if defined(_OPENMP)
#define LLAMA_PARALLEL_FOR _Pragma("omp parallel for schedule(static)")
#else
#define LLAMA_PARALLEL_FOR
#endif

namespace llama {

/// The hyper-parameters of a llama model: GGUF's llama.* metadata.
struct Config {
  int n_vocab = 259;       ///< tokens (the byte-level demo: 3 specials + 256 bytes)
  int n_embd = 128;        ///< E: llama.embedding_length
  int n_layer = 4;         ///< llama.block_count
  int n_head = 4;          ///< llama.attention.head_count
  int n_head_kv = 2;       ///< llama.attention.head_count_kv (grouped-query when < n_head)
  int n_ff = 384;          ///< llama.feed_forward_length
  int n_ctx = 256;         ///< llama.context_length
  float rms_eps = 1e-5f;   ///< llama.attention.layer_norm_rms_epsilon
  float rope_base = 1e4f;  ///< llama.rope.freq_base
  int head_dim() const { return n_embd / n_head; }
  int n_embd_kv() const { return head_dim() * n_head_kv; }

  void validate() const {
    if (n_vocab < 1 || n_embd < 2 || n_layer < 1 || n_head < 1 || n_head_kv < 1 || n_ff < 1 ||
        n_ctx < 2)
      throw std::invalid_argument("llama::Config: every size must be positive (n_embd >= 2)");
    if (n_embd % n_head != 0 || head_dim() % 2 != 0)
      throw std::invalid_argument("llama::Config: n_embd (" + std::to_string(n_embd) +
                                  ") must be a multiple of n_head (" + std::to_string(n_head) +
                                  ") with an even head dimension");
    if (n_head % n_head_kv != 0)
      throw std::invalid_argument("llama::Config: n_head (" + std::to_string(n_head) +
                                  ") must be a multiple of n_head_kv (" +
                                  std::to_string(n_head_kv) + ")");
    if (!(rms_eps > 0.0f) || !(rope_base > 0.0f))
      throw std::invalid_argument("llama::Config: rms_eps and rope_base must be positive");
  }
};

/// The seven projections of a block, in GGUF's names.
enum class Proj { Q = 0, K, V, O, Gate, Up, Down };
inline constexpr int kProjections = 7;
inline const char* gguf_name(Proj p) {
  static const char* names[] = {"attn_q",   "attn_k", "attn_v",  "attn_output",
                                "ffn_gate", "ffn_up", "ffn_down"};
  return names[static_cast<int>(p)];
}

/// One projection without bias (out x in), in one of three modes: trainable dense (pretraining,
/// full fine-tuning), frozen (in `Frozen`, any lora storage: fp32, bf16, NF4, ...), or frozen with
/// a LoRA adapter (lora::LoRALinear: only A and B train).
template <typename T, typename Frozen = lora::DenseFrozenWeight<T>>
class Projection {
 public:
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  using Layer = lora::LoRALinear<T, Frozen>;

  explicit Projection(Matrix W) : W_(std::move(W)) { grad_W_.setZero(W_.rows(), W_.cols()); }

  bool trainable() const { return !frozen_ && !lora_; }
  bool adapted() const { return lora_.has_value(); }

  /// Moves W into the frozen storage; its gradient is gone.
  void freeze() {
    if (!trainable()) return;
    frozen_.emplace(W_);
    W_.resize(0, 0);
    grad_W_.resize(0, 0);
  }

  /// Freezes W (if it is not yet) and puts a fresh LoRA adapter on it (B = 0: outputs unchanged).
  void adapt(const lora::LoRAConfig& config) {
    if (lora_) throw std::logic_error("llama::Projection::adapt: already adapted");
    freeze();
    lora_.emplace(std::move(*frozen_), Vector(), config);
    frozen_.reset();
  }

  Layer& layer() { return *lora_; }              ///< the LoRA layer (adapted() only)
  const Layer& layer() const { return *lora_; }  ///< the LoRA layer (adapted() only)

  Eigen::Index rows() const {
    return lora_ ? lora_->out_features() : frozen_ ? frozen_->out_features() : W_.rows();
  }
  Eigen::Index cols() const {
    return lora_ ? lora_->in_features() : frozen_ ? frozen_->in_features() : W_.cols();
  }

  /// The weight without the adapter: W, or the frozen W0 as stored (widened to T).
  Matrix base_weight() const {
    if (lora_) return lora_->frozen().weight();
    if (frozen_) return frozen_->weight();
    return W_;
  }

  /// Switches the adapter off (the frozen product alone) or on again; nothing else changes.
  void set_adapter_enabled(bool enabled) { adapter_enabled_ = enabled; }

  /// H = W X (+ s B A X when adapted).  X: in x N,  H: out x N.
  void forward(const Eigen::Ref<const Matrix>& X, Eigen::Ref<Matrix> H,
               lora::Workspace<T>& ws) const {
    if (lora_ && !adapter_enabled_) {
      lora_->frozen().multiply(X, H);
    } else if (lora_) {
      lora_->forward(X, H, ws);
    } else if (frozen_) {
      frozen_->multiply(X, H);
    } else {
      H.noalias() = W_ * X;
    }
  }

  /// Accumulates the gradients of what trains for G = dL/dH and writes dL/dX into dX (in x N).
  void backward(const Eigen::Ref<const Matrix>& X, const Eigen::Ref<const Matrix>& G, Matrix& dX,
                lora::Workspace<T>& ws) {
    dX.resize(cols(), X.cols());
    if (lora_ && !adapter_enabled_)
      throw std::logic_error("llama::Projection::backward: the adapter is switched off");
    if (lora_) {
      lora_->backward(X, G, dX, ws);
    } else if (frozen_) {
      dX.setZero();
      frozen_->multiply_transposed_add(G, dX);
    } else {
      grad_W_.noalias() += G * X.transpose();
      dX.noalias() = W_.transpose() * G;
    }
  }

  void zero_grad() {
    if (lora_) {
      lora_->zero_grad();
    } else if (!frozen_) {
      grad_W_.setZero();
    }
  }

  /// What trains, as optimizer views: W (trainable), A and B (adapted), or nothing (frozen).
  void append_parameters(std::vector<lora::ParameterView<T>>& out, const std::string& name) {
    if (lora_) {
      for (auto& p : lora_->parameters()) {
        p.name = name + "." + p.name;
        out.push_back(std::move(p));
      }
    } else if (!frozen_) {
      out.push_back(lora::make_parameter(W_, grad_W_, name));
    }
  }

  /// Numbers that train.
  Eigen::Index trainable_parameter_count() const {
    if (lora_) return lora_->trainable_parameter_count();
    return frozen_ ? 0 : W_.size();
  }

 private:
  Matrix W_, grad_W_;
  std::optional<Frozen> frozen_;
  std::optional<Layer> lora_;
  bool adapter_enabled_ = true;
};

/// The weights of a model as llama.cpp names and shapes them (PyTorch's out x in for projections;
/// token_embd as E x n_vocab, a column per token; output empty when tied to token_embd).
template <typename T>
struct Weights {
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  struct Block {
    Vector attn_norm, ffn_norm;
    Matrix proj[kProjections];  // indexed by Proj
  };
  Matrix token_embd;  // E x n_vocab
  Vector output_norm;
  Matrix output;  // n_vocab x E, or empty (tied)
  std::vector<Block> blocks;
};

/// The whole model. Copyable (copy a pretrained model, then adapt or fine-tune the copy).
template <typename T, typename Frozen = lora::DenseFrozenWeight<T>>
class Model {
 public:
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
  using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  using Proj_ = Projection<T, Frozen>;

  /// Random initialisation (pretraining): embeddings N(0, 1) (every use goes through an RMSNorm),
  /// projections N(0, 1/in) (attn_output and ffn_down scaled down by sqrt(2 n_layer), as GPT-2's
  /// residual projections), norms 1, an untied output.
  Model(const Config& config, lora::Rng& rng) : Model(config, random_weights(config, rng)) {}

  /// A model from given weights (a GGUF file's, say); validated against the config.
  Model(const Config& config, Weights<T> w) : cfg_(config) {
    cfg_.validate();
    const Eigen::Index E = cfg_.n_embd, V = cfg_.n_vocab;
    require_shape("token_embd", w.token_embd, E, V);
    require_shape("output_norm", w.output_norm, E, 1);
    if (w.output.size() != 0) require_shape("output", w.output, V, E);
    if (static_cast<int>(w.blocks.size()) != cfg_.n_layer)
      throw std::invalid_argument("llama::Model: " + std::to_string(w.blocks.size()) +
                                  " blocks given, the config says " + std::to_string(cfg_.n_layer));
    token_embd_ = std::move(w.token_embd);
    grad_token_embd_.setZero(E, V);
    output_norm_ = std::move(w.output_norm);
    grad_output_norm_.setZero(E);
    if (w.output.size() != 0) output_.emplace(std::move(w.output));
    for (int l = 0; l < cfg_.n_layer; ++l) {
      auto& b = w.blocks[static_cast<std::size_t>(l)];
      const std::string at = "blk." + std::to_string(l) + ".";
      require_shape(at + "attn_norm", b.attn_norm, E, 1);
      require_shape(at + "ffn_norm", b.ffn_norm, E, 1);
      const Eigen::Index outs[] = {E, cfg_.n_embd_kv(), cfg_.n_embd_kv(), E, cfg_.n_ff, cfg_.n_ff,
                                   E};
      const Eigen::Index ins[] = {E, E, E, E, E, E, cfg_.n_ff};
      for (int p = 0; p < kProjections; ++p)
        require_shape(at + gguf_name(static_cast<Proj>(p)), b.proj[p], outs[p], ins[p]);
      blocks_.emplace_back(std::move(b));
      blocks_.back().grad_attn_norm.setZero(E);
      blocks_.back().grad_ffn_norm.setZero(E);
    }
    rope_tables();
  }

  const Config& config() const { return cfg_; }
  bool tied_output() const { return !output_.has_value(); }

  Proj_& projection(int layer, Proj p) {
    return blocks_[static_cast<std::size_t>(layer)].proj[static_cast<int>(p)];
  }
  const Proj_& projection(int layer, Proj p) const {
    return blocks_[static_cast<std::size_t>(layer)].proj[static_cast<int>(p)];
  }
  const Matrix& token_embd() const { return token_embd_; }
  const Vector& output_norm() const { return output_norm_; }
  const Vector& attn_norm(int layer) const {
    return blocks_[static_cast<std::size_t>(layer)].attn_norm;
  }
  const Vector& ffn_norm(int layer) const {
    return blocks_[static_cast<std::size_t>(layer)].ffn_norm;
  }
  const Proj_* output() const { return output_ ? &*output_ : nullptr; }

  /// Freezes everything (embeddings, norms, projections, output) and puts LoRA adapters with
  /// `config` on the projections in `which` of every block. Only A and B train afterwards.
  void adapt(const lora::LoRAConfig& config, const std::vector<Proj>& which) {
    train_embeddings_and_norms_ = false;
    for (auto& b : blocks_)
      for (int p = 0; p < kProjections; ++p) b.proj[p].freeze();
    if (output_) output_->freeze();
    // Each projection draws its own A: the seed is offset by its place in the model.
    for (std::size_t l = 0; l < blocks_.size(); ++l)
      for (Proj p : which) {
        lora::LoRAConfig own = config;
        own.seed = config.seed + 1 + l * kProjections + static_cast<std::uint64_t>(p);
        blocks_[l].proj[static_cast<int>(p)].adapt(own);
      }
  }

  /// Freezes every weight (embeddings, norms, projections, output) without adapting any: the
  /// frozen products are then the ones an adapted copy computes with its adapters switched off.
  void freeze() { adapt(lora::LoRAConfig{}, {}); }

  /// Switches every adapter off (outputs: the frozen base's, bit for bit) or on again.
  void set_adapters_enabled(bool enabled) {
    for (auto& b : blocks_)
      for (auto& p : b.proj) p.set_adapter_enabled(enabled);
  }

  /// Every trainable tensor as an optimizer view, named as in GGUF.
  std::vector<lora::ParameterView<T>> parameters() {
    std::vector<lora::ParameterView<T>> out;
    if (train_embeddings_and_norms_) {
      out.push_back(lora::make_parameter(token_embd_, grad_token_embd_, "token_embd.weight"));
      out.push_back(lora::make_parameter(output_norm_, grad_output_norm_, "output_norm.weight"));
    }
    for (std::size_t l = 0; l < blocks_.size(); ++l) {
      Block& b = blocks_[l];
      const std::string at = "blk." + std::to_string(l) + ".";
      if (train_embeddings_and_norms_) {
        out.push_back(lora::make_parameter(b.attn_norm, b.grad_attn_norm, at + "attn_norm.weight"));
        out.push_back(lora::make_parameter(b.ffn_norm, b.grad_ffn_norm, at + "ffn_norm.weight"));
      }
      for (int p = 0; p < kProjections; ++p)
        b.proj[p].append_parameters(out, at + gguf_name(static_cast<Proj>(p)) + ".weight");
    }
    if (output_) output_->append_parameters(out, "output.weight");
    return out;
  }

  Eigen::Index trainable_parameter_count() {
    Eigen::Index n = 0;
    for (const auto& p : parameters()) n += p.value.size();
    return n;
  }

  void zero_grad() {
    grad_token_embd_.setZero();
    grad_output_norm_.setZero();
    for (auto& b : blocks_) {
      b.grad_attn_norm.setZero();
      b.grad_ffn_norm.setZero();
      for (auto& p : b.proj) p.zero_grad();
    }
    if (output_) output_->zero_grad();
  }

  /// Logits (n_vocab x S L) of S sequences of L tokens (tokens.size() == S L; each sequence
  /// starts at position 0). Keeps the activations for backward().
  const Matrix& forward(const std::vector<int>& tokens, int L) {
    check_tokens(tokens, L);
    L_ = L;
    S_ = static_cast<int>(tokens.size()) / L;
    tokens_ = tokens;
    const Eigen::Index N = static_cast<Eigen::Index>(tokens.size());
    x0_.resize(cfg_.n_embd, N);
    for (Eigen::Index j = 0; j < N; ++j)
      x0_.col(j) = token_embd_.col(tokens_[static_cast<std::size_t>(j)]);
    const Matrix* x = &x0_;
    for (auto& b : blocks_) {
      block_forward(b, *x);
      x = &b.out;
    }
    rms_norm(*x, output_norm_, final_r_, final_n_);
    logits_.resize(cfg_.n_vocab, N);
    if (output_) {
      output_->forward(final_n_, logits_, ws_);
    } else {
      logits_.noalias() = token_embd_.transpose() * final_n_;
    }
    return logits_;
  }

  /// Mean next-token cross-entropy (natural log) of the last forward(): position j of each
  /// sequence predicts token j + 1. Also writes dL/dlogits for backward().
  double loss_and_grad() {
    const Eigen::Index N = logits_.cols();
    dlogits_.setZero(logits_.rows(), N);
    const double count = static_cast<double>(S_) * (L_ - 1);
    double total = 0.0;
    for (int s = 0; s < S_; ++s) {
      for (int j = 0; j + 1 < L_; ++j) {
        const Eigen::Index c = static_cast<Eigen::Index>(s) * L_ + j;
        const int target = tokens_[static_cast<std::size_t>(c + 1)];
        const T m = logits_.col(c).maxCoeff();
        auto e = (logits_.col(c).array() - m).exp();
        const T z = e.sum();
        total += static_cast<double>(std::log(z) + m - logits_(target, c));
        dlogits_.col(c) = (e / (z * static_cast<T>(count))).matrix();
        dlogits_(target, c) -= static_cast<T>(1.0 / count);
      }
    }
    return total / count;
  }

  /// Accumulates the gradients of what trains, from the last forward() and loss_and_grad().
  void backward() {
    Matrix& g = dx_;  // dL/d(output of the last block)
    Matrix dn;
    if (output_) {
      output_->backward(final_n_, dlogits_, dn, ws_);
    } else {
      dn.noalias() = token_embd_ * dlogits_;
      if (train_embeddings_and_norms_)
        grad_token_embd_.noalias() += final_n_ * dlogits_.transpose();
    }
    const Matrix& last = blocks_.empty() ? x0_ : blocks_.back().out;
    g.resize(cfg_.n_embd, last.cols());
    rms_norm_backward(last, output_norm_, final_r_, dn, g, grad_output_norm_);
    for (std::size_t l = blocks_.size(); l-- > 0;) {
      const Matrix& x_in = l == 0 ? x0_ : blocks_[l - 1].out;
      block_backward(blocks_[l], x_in, g);
    }
    if (train_embeddings_and_norms_)
      for (Eigen::Index j = 0; j < g.cols(); ++j)
        grad_token_embd_.col(tokens_[static_cast<std::size_t>(j)]) += g.col(j);
  }

 private:
  struct Block {
    explicit Block(typename Weights<T>::Block&& w)
        : attn_norm(std::move(w.attn_norm)),
          ffn_norm(std::move(w.ffn_norm)),
          proj{Proj_(std::move(w.proj[0])), Proj_(std::move(w.proj[1])),
               Proj_(std::move(w.proj[2])), Proj_(std::move(w.proj[3])),
               Proj_(std::move(w.proj[4])), Proj_(std::move(w.proj[5])),
               Proj_(std::move(w.proj[6]))} {}
    Vector attn_norm, ffn_norm, grad_attn_norm, grad_ffn_norm;
    Proj_ proj[kProjections];
    // Activations of the last forward, kept for backward.
    Matrix n, q, k, v, attn, h, m, a, u, act, out;  // see the header comment
    Vector r1, r2;                                  // rmsnorm's r per column
    std::vector<Matrix> P;                          // softmax per (sequence, head): L x L
  };

  static void require_shape(const std::string& name, const Eigen::Ref<const Matrix>& m,
                            Eigen::Index rows, Eigen::Index cols) {
    if (m.rows() != rows || m.cols() != cols)
      throw std::invalid_argument("llama::Model: " + name + " is " + std::to_string(m.rows()) +
                                  " x " + std::to_string(m.cols()) + ", expected " +
                                  std::to_string(rows) + " x " + std::to_string(cols));
  }

  void check_tokens(const std::vector<int>& tokens, int L) const {
    if (L < 1 || L > cfg_.n_ctx || tokens.empty() ||
        tokens.size() % static_cast<std::size_t>(L) != 0)
      throw std::invalid_argument("llama::Model::forward: " + std::to_string(tokens.size()) +
                                  " tokens are not whole sequences of L = " + std::to_string(L) +
                                  " (1 <= L <= n_ctx = " + std::to_string(cfg_.n_ctx) + ")");
    for (int t : tokens)
      if (t < 0 || t >= cfg_.n_vocab)
        throw std::invalid_argument("llama::Model::forward: token id " + std::to_string(t) +
                                    " outside [0, " + std::to_string(cfg_.n_vocab) + ")");
  }

  static Weights<T> random_weights(const Config& c, lora::Rng& rng) {
    c.validate();
    Weights<T> w;
    w.token_embd.resize(c.n_embd, c.n_vocab);
    lora::fill_normal(w.token_embd, rng, 0.0, 1.0);
    w.output_norm.setOnes(c.n_embd);
    w.output.resize(c.n_vocab, c.n_embd);
    lora::fill_normal(w.output, rng, 0.0, 1.0 / std::sqrt(static_cast<double>(c.n_embd)));
    const int outs[] = {c.n_embd, c.n_embd_kv(), c.n_embd_kv(), c.n_embd, c.n_ff, c.n_ff, c.n_embd};
    const int ins[] = {c.n_embd, c.n_embd, c.n_embd, c.n_embd, c.n_embd, c.n_embd, c.n_ff};
    for (int l = 0; l < c.n_layer; ++l) {
      typename Weights<T>::Block b;
      b.attn_norm.setOnes(c.n_embd);
      b.ffn_norm.setOnes(c.n_embd);
      for (int p = 0; p < kProjections; ++p) {
        b.proj[p].resize(outs[p], ins[p]);
        // Residual outputs (attn_output, ffn_down) start smaller, as GPT-2's scaled init.
        double sd = 1.0 / std::sqrt(static_cast<double>(ins[p]));
        if (p == static_cast<int>(Proj::O) || p == static_cast<int>(Proj::Down))
          sd /= std::sqrt(2.0 * c.n_layer);
        lora::fill_normal(b.proj[p], rng, 0.0, sd);
      }
      w.blocks.push_back(std::move(b));
    }
    return w;
  }

  // cos and sin of position p's angle for pair i: p * base^(-2i / head_dim), in double.
  void rope_tables() {
    const int half = cfg_.head_dim() / 2;
    cos_.resize(half, cfg_.n_ctx);
    sin_.resize(half, cfg_.n_ctx);
    for (int p = 0; p < cfg_.n_ctx; ++p)
      for (int i = 0; i < half; ++i) {
        const double theta =
            p * std::pow(static_cast<double>(cfg_.rope_base), -2.0 * i / cfg_.head_dim());
        cos_(i, p) = static_cast<T>(std::cos(theta));
        sin_(i, p) = static_cast<T>(std::sin(theta));
      }
  }

  // Rotates each head's pairs of every column (sign +1) or rotates them back (sign -1).
  void rope(Matrix& x, T sign) const {
    const int hd = cfg_.head_dim();
    const Eigen::Index heads = x.rows() / hd;
    for (Eigen::Index j = 0; j < x.cols(); ++j) {
      const Eigen::Index p = j % L_;
      for (Eigen::Index h = 0; h < heads; ++h) {
        T* v = x.col(j).data() + h * hd;
        for (int i = 0; i < hd / 2; ++i) {
          const T c = cos_(i, p), s = sign * sin_(i, p);
          const T x0 = v[2 * i], x1 = v[2 * i + 1];
          v[2 * i] = x0 * c - x1 * s;
          v[2 * i + 1] = x0 * s + x1 * c;
        }
      }
    }
  }

  void rms_norm(const Matrix& x, const Vector& w, Vector& r, Matrix& y) const {
    r.resize(x.cols());
    y.resize(x.rows(), x.cols());
    for (Eigen::Index j = 0; j < x.cols(); ++j) {
      double ss = 0;  // in double, as ggml's rms_norm sums
      for (Eigen::Index i = 0; i < x.rows(); ++i) ss += static_cast<double>(x(i, j)) * x(i, j);
      const double ms = ss / static_cast<double>(x.rows());
      r(j) = static_cast<T>(1.0 / std::sqrt(ms + static_cast<double>(cfg_.rms_eps)));
      y.col(j) = x.col(j).cwiseProduct(w) * r(j);
    }
  }

  // dx (+)= d rmsnorm / dx given g = dL/dy; grad_w += g .* x r when norms train.
  void rms_norm_backward(const Matrix& x, const Vector& w, const Vector& r, const Matrix& g,
                         Matrix& dx, Vector& grad_w) const {
    const T inv_e = T(1) / static_cast<T>(x.rows());
    for (Eigen::Index j = 0; j < x.cols(); ++j) {
      const auto gw = g.col(j).cwiseProduct(w);
      const T dot = gw.dot(x.col(j));
      dx.col(j) = r(j) * gw - x.col(j) * (r(j) * r(j) * r(j) * dot * inv_e);
      if (train_embeddings_and_norms_) grad_w += g.col(j).cwiseProduct(x.col(j)) * r(j);
    }
  }

  void block_forward(Block& b, const Matrix& x) {
    const Eigen::Index N = x.cols();
    const int hd = cfg_.head_dim(), group = cfg_.n_head / cfg_.n_head_kv;
    rms_norm(x, b.attn_norm, b.r1, b.n);
    b.q.resize(cfg_.n_embd, N);
    b.k.resize(cfg_.n_embd_kv(), N);
    b.v.resize(cfg_.n_embd_kv(), N);
    b.proj[0].forward(b.n, b.q, ws_);
    b.proj[1].forward(b.n, b.k, ws_);
    b.proj[2].forward(b.n, b.v, ws_);
    rope(b.q, T(1));
    rope(b.k, T(1));
    b.attn.resize(cfg_.n_embd, N);
    b.P.resize(static_cast<std::size_t>(S_) * cfg_.n_head);
    const T scale = T(1) / std::sqrt(static_cast<T>(hd));
    const int tasks = S_ * cfg_.n_head;
    LLAMA_PARALLEL_FOR
    for (int t = 0; t < tasks; ++t) {
      const int s = t / cfg_.n_head, h = t % cfg_.n_head, g = h / group;
      const Eigen::Index c0 = static_cast<Eigen::Index>(s) * L_;
      Matrix& P = b.P[static_cast<std::size_t>(t)];
      // P(j, i) = softmax over j <= i of k_j . q_i * scale (column i: query i)
      P.noalias() = b.k.block(g * hd, c0, hd, L_).transpose() * b.q.block(h * hd, c0, hd, L_);
      for (int i = 0; i < L_; ++i) {
        auto col = P.col(i).head(i + 1);
        col *= scale;
        const T m = col.maxCoeff();
        col = (col.array() - m).exp();
        col /= col.sum();
        P.col(i).tail(L_ - i - 1).setZero();
      }
      b.attn.block(h * hd, c0, hd, L_).noalias() = b.v.block(g * hd, c0, hd, L_) * P;
    }
    b.h.resize(cfg_.n_embd, N);
    b.proj[3].forward(b.attn, b.h, ws_);
    b.h += x;
    rms_norm(b.h, b.ffn_norm, b.r2, b.m);
    b.a.resize(cfg_.n_ff, N);
    b.u.resize(cfg_.n_ff, N);
    b.proj[4].forward(b.m, b.a, ws_);
    b.proj[5].forward(b.m, b.u, ws_);
    b.act = (b.a.array() / (T(1) + (-b.a.array()).exp())) * b.u.array();
    b.out.resize(cfg_.n_embd, N);
    b.proj[6].forward(b.act, b.out, ws_);
    b.out += b.h;
  }

  // g: dL/d(block output) on entry, dL/d(block input) on return.
  void block_backward(Block& b, const Matrix& x, Matrix& g) {
    const Eigen::Index N = x.cols();
    const int hd = cfg_.head_dim(), group = cfg_.n_head / cfg_.n_head_kv;
    // FFN: out = h + W_down(act), act = silu(a) .* u
    Matrix dact, dm, dm_up, dh;
    b.proj[6].backward(b.act, g, dact, ws_);
    Matrix da(cfg_.n_ff, N), du(cfg_.n_ff, N);
    {
      const auto sig = (T(1) / (T(1) + (-b.a.array()).exp())).eval();
      const auto silu = (b.a.array() * sig).eval();
      du.array() = dact.array() * silu;
      da.array() = dact.array() * b.u.array() * sig * (T(1) + b.a.array() * (T(1) - sig));
    }
    b.proj[4].backward(b.m, da, dm, ws_);
    b.proj[5].backward(b.m, du, dm_up, ws_);
    dm += dm_up;
    dh = g;  // residual
    Matrix dh_norm(cfg_.n_embd, N);
    rms_norm_backward(b.h, b.ffn_norm, b.r2, dm, dh_norm, b.grad_ffn_norm);
    dh += dh_norm;
    // Attention: h = x + W_o(attn)
    Matrix dattn;
    b.proj[3].backward(b.attn, dh, dattn, ws_);
    Matrix dq(cfg_.n_embd, N), dk = Matrix::Zero(cfg_.n_embd_kv(), N),
                               dv = Matrix::Zero(cfg_.n_embd_kv(), N);
    const T scale = T(1) / std::sqrt(static_cast<T>(hd));
    const int tasks = S_ * cfg_.n_head_kv;  // one task per (sequence, kv head): no shared writes
    LLAMA_PARALLEL_FOR
    for (int t = 0; t < tasks; ++t) {
      const int s = t / cfg_.n_head_kv, g_kv = t % cfg_.n_head_kv;
      const Eigen::Index c0 = static_cast<Eigen::Index>(s) * L_;
      Matrix dP, dS;
      for (int h = g_kv * group; h < (g_kv + 1) * group; ++h) {
        const Matrix& P = b.P[static_cast<std::size_t>(s) * cfg_.n_head + h];
        const auto G = dattn.block(h * hd, c0, hd, L_);
        dv.block(g_kv * hd, c0, hd, L_).noalias() += G * P.transpose();
        dP.noalias() = b.v.block(g_kv * hd, c0, hd, L_).transpose() * G;
        dS = P.cwiseProduct(dP);
        for (int i = 0; i < L_; ++i) {
          const T sum = dS.col(i).sum();
          dS.col(i) -= P.col(i) * sum;
        }
        dS *= scale;
        dq.block(h * hd, c0, hd, L_).noalias() = b.k.block(g_kv * hd, c0, hd, L_) * dS;
        dk.block(g_kv * hd, c0, hd, L_).noalias() += b.q.block(h * hd, c0, hd, L_) * dS.transpose();
      }
    }
    rope(dq, T(-1));
    rope(dk, T(-1));
    Matrix dn, dn_part;
    b.proj[0].backward(b.n, dq, dn, ws_);
    b.proj[1].backward(b.n, dk, dn_part, ws_);
    dn += dn_part;
    b.proj[2].backward(b.n, dv, dn_part, ws_);
    dn += dn_part;
    Matrix dx_norm(cfg_.n_embd, N);
    rms_norm_backward(x, b.attn_norm, b.r1, dn, dx_norm, b.grad_attn_norm);
    g = dh + dx_norm;
  }

  Config cfg_;
  Matrix token_embd_, grad_token_embd_;
  Vector output_norm_, grad_output_norm_;
  std::optional<Proj_> output_;
  std::vector<Block> blocks_;
  bool train_embeddings_and_norms_ = true;
  Matrix cos_, sin_;
  // The last forward.
  int L_ = 0, S_ = 0;
  std::vector<int> tokens_;
  Matrix x0_, final_n_, logits_, dlogits_, dx_;
  Vector final_r_;
  lora::Workspace<T> ws_;
};

}  // namespace llama
