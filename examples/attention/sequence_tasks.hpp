// Two related synthetic sequence tasks, drawn with lora::Rng from a seed.
//
// Vocabulary: [CLS] (id 0), K "alpha" tokens a_0..a_{K-1}, K "beta" tokens b_0..b_{K-1} and F
// filler tokens. Each sequence is [CLS] followed by `positions` tokens: one alpha token, one beta
// token, or one of each (at distinct random positions), and fillers everywhere else. The label is
// the index of one of the two marked tokens:
//
//   upstream   (Rule::AlphaFirst): i for the alpha token a_i when there is one, else j for b_j;
//   downstream (Rule::BetaFirst):  j for the beta token b_j when there is one, else i for a_i.
//
// Upstream draws both tokens in half the sequences and one of them in the rest, so pretraining
// teaches the model to read either identity, and to prefer alpha. Downstream sequences all hold
// both tokens: only the priority is reversed. The base attends from [CLS] to the alpha token, so
// it is at chance (1/K: the two labels are independent) downstream; adapting means attending to
// the beta token instead (a change of the attention pattern: W_q or W_k), or suppressing what the
// alpha token contributes to the values read (W_v or W_o).
//
// A second downstream task, `shift` > 0, also relabels: the label of b_j becomes (j + shift) mod K.
// Besides the new attention pattern, the identities read must now map to other classes: a
// permutation, which the frozen head can only be given through W_v or W_o, and whose update has a
// rank of about K - 1 (no low-rank shortcut).
#pragma once

#include "attention/attention_model.hpp"

#include <lora/random.hpp>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace attention {

enum class Rule { AlphaFirst, BetaFirst };

struct TaskSpec {
  int classes = 8;     ///< K: alpha tokens, beta tokens and classes
  int fillers = 8;     ///< F
  int positions = 12;  ///< tokens after [CLS]; at least 2

  int vocab() const { return 1 + 2 * classes + fillers; }
  int seq_len() const { return 1 + positions; }
  int alpha(int i) const { return 1 + i; }
  int beta(int j) const { return 1 + classes + j; }
  int filler(int f) const { return 1 + 2 * classes + f; }
};

/// A uniform integer in [0, n) (n small: the modulo bias of 2^64 mod n is negligible).
inline int uniform_int(lora::Rng& rng, int n) {
  return static_cast<int>(rng.next() % static_cast<std::uint64_t>(n));
}

/// n sequences labelled by `rule`; each holds both marked tokens with probability p_both, else
/// one of them (alpha or beta with equal probability). Every label is shifted by `shift` (mod K).
/// Drawn from rng.
inline Batch make_task(Rule rule, double p_both, int n, const TaskSpec& spec, lora::Rng& rng,
                       int shift = 0) {
  if (spec.classes < 2 || spec.fillers < 1 || spec.positions < 2 || !(p_both >= 0 && p_both <= 1) ||
      shift < 0)
    throw std::invalid_argument(
        "attention::make_task: need classes >= 2, fillers >= 1, positions >= 2, p_both in [0, 1], "
        "shift >= 0");
  Batch batch;
  const int L = spec.seq_len();
  batch.tokens.reserve(static_cast<std::size_t>(n) * L);
  batch.labels.reserve(n);
  for (int s = 0; s < n; ++s) {
    const int a = uniform_int(rng, spec.classes), b = uniform_int(rng, spec.classes);
    const bool both = rng.bernoulli(p_both);
    const bool alpha_only = !both && rng.bernoulli(0.5);
    const bool has_alpha = both || alpha_only, has_beta = both || !alpha_only;
    const int pa = 1 + uniform_int(rng, spec.positions);
    int pb = 1 + uniform_int(rng, spec.positions - 1);
    if (pb >= pa) ++pb;         // distinct from pa
    batch.tokens.push_back(0);  // [CLS]
    for (int t = 1; t < L; ++t) {
      const int filler = spec.filler(uniform_int(rng, spec.fillers));
      batch.tokens.push_back(has_alpha && t == pa  ? spec.alpha(a)
                             : has_beta && t == pb ? spec.beta(b)
                                                   : filler);
    }
    const bool alpha_wins = rule == Rule::AlphaFirst ? has_alpha : !has_beta;
    batch.labels.push_back(((alpha_wins ? a : b) + shift) % spec.classes);
  }
  return batch;
}

/// The sequences with the given indices, in that order.
inline void gather(const Batch& from, const std::vector<int>& index, int begin, int end, int L,
                   Batch& out) {
  out.tokens.resize(static_cast<std::size_t>(end - begin) * L);
  out.labels.resize(end - begin);
  for (int i = begin; i < end; ++i) {
    const int s = index[i];
    std::copy(from.tokens.begin() + static_cast<std::ptrdiff_t>(s) * L,
              from.tokens.begin() + static_cast<std::ptrdiff_t>(s + 1) * L,
              out.tokens.begin() + static_cast<std::ptrdiff_t>(i - begin) * L);
    out.labels[i - begin] = from.labels[s];
  }
}

}  // namespace attention
