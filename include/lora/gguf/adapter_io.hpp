// LoRA adapters in llama.cpp's GGUF format, both ways (llama.cpp's loader: src/llama-adapter.cpp).
//
// A file holds `general.type = "adapter"`, `adapter.type = "lora"`, `general.architecture` (the
// base model's: llama.cpp refuses any other), `adapter.lora.alpha` (f32; llama.cpp aborts on any
// other type) and, per adapted weight of the base, two tensors named after it:
//   <base tensor>.lora_a   A, ne = [k, r]   (PEFT's lora_A.weight, r x k, as it is)
//   <base tensor>.lora_b   B, ne = [r, d]   (PEFT's lora_B.weight, d x r, as it is)
// e.g. "blk.0.attn_q.weight.lora_a". llama.cpp reads r from each B and computes
//   W x + scale * (alpha / r) * B (A x)       (scale: the user's, 1 by default; alpha 0: no
//   alpha/r)
// with ONE alpha per file. lora's adapters each have their own scaling s (alpha / r, rsLoRA's
// alpha / sqrt(r), per-module ranks and alphas): the writer picks the alpha most modules agree on
// (s * r) and folds the factor s * r / alpha into B for the others, so that llama.cpp computes
// exactly s * B * A for every module; the folded modules are listed in the file's metadata
// (`lora.folded_modules`). Reading such a file back gives adapters with scaling alpha / r and the
// folded B: the same s * B * A.
//
// The token embedding is the exception (llama.cpp's build_inp_embd gathers rows of lora_a):
//   token_embd.weight.lora_a   A^T, ne = [r, n_vocab]   (PEFT's lora_embedding_A, transposed, as
//                                                        llama.cpp's converter writes it)
//   token_embd.weight.lora_b   B,   ne = [r, n_embd]    (PEFT's lora_embedding_B, as it is)
// and the embedding of token t becomes W0[t] + (alpha / r) B A(:, t): LoRAEmbedding's adapter (A:
// r x n_vocab, B: n_embd x r), which this file reads and writes under that name.
//
// Modules are named by their base tensor ("blk.0.attn_q.weight"). What llama.cpp cannot apply is
// refused on writing, with a message saying why: DoRA (no magnitude in llama.cpp's format: merge
// it into the base instead), a lora bias, a token_embd adapter on a base whose output head is tied
// to token_embd (llama.cpp would adapt the lookup only, untying them: merge it instead), Q8_0 with
// a dimension that is not a multiple of 32 (r, and in features for linear layers). What
// llama.cpp refuses on loading is refused by the reader first, with a better message: another
// architecture than the base's, a tensor the base does not have, half a pair, a wrong shape.
#pragma once

#include "lora/gguf/base_weights.hpp"
#include "lora/io/gguf.hpp"
#include "lora/io/gguf_writer.hpp"
#include "lora/lora_linear.hpp"
#include "lora/multi_lora_linear.hpp"
#include "lora/peft/make_layers.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace lora::gguf {

using io::FormatError;

/// The suffix of a module's A tensor: "<base tensor>.lora_a".
inline constexpr const char* kLoraASuffix = ".lora_a";
/// The suffix of a module's B tensor: "<base tensor>.lora_b".
inline constexpr const char* kLoraBSuffix = ".lora_b";
/// The metadata key listing the modules whose B holds a folded factor s * r / alpha.
inline constexpr const char* kFoldedModulesKey = "lora.folded_modules";

/// How an adapter file is written.
struct SaveOptions {
  /// `general.architecture`, which must be the base model's ("llama", "qwen2", ...). Taken from
  /// `base` when that is given (and then must be empty or equal).
  std::string architecture;
  /// The base model the adapter is for: when given, every module must name one of its 2-D
  /// tensors, with the adapter's shape (out x in = ne[1] x ne[0]).
  const io::GgufFile* base = nullptr;
  /// The tensors' type: F32, F16, BF16 or Q8_0 (Q8_0: r and in features multiples of 32).
  io::GgmlType type = io::GgmlType::F32;
  /// `general.name`, written when not empty.
  std::string name;
};

/// How an adapter file is read.
struct ReadOptions {
  /// The base model: when given, the file's architecture must be the base's and every module
  /// must name a 2-D tensor of the base with the adapter's shape (what llama.cpp checks).
  const io::GgufFile* base = nullptr;
};

/// An adapter read from a GGUF file.
template <typename T>
struct AdapterFile {
  std::string architecture;  ///< general.architecture
  float alpha = 0;           ///< adapter.lora.alpha (0 when absent: llama.cpp then uses s = 1)
  std::vector<std::string> folded_modules;        ///< modules whose B holds a folded factor
  std::map<std::string, LoRAAdapter<T>> modules;  ///< by base tensor name
};

namespace detail {

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

inline std::string quoted(const std::string& s) {
  return io::detail::gguf_quote(s);
}

/// llama.cpp lays out the token embedding's adapter differently from a linear layer's (see the top
/// of this file); it tells them apart by this name.
inline bool is_token_embedding(const std::string& module) {
  return ends_with(module, "token_embd.weight");
}

/// Checks that `module` is a 2-D tensor of `base` shaped for an adapter with out_features() = out
/// and in_features() = in: ne = [in, out] for a linear weight, [out, in] = [n_embd, n_vocab] for
/// the token embedding (whose LoRAEmbedding adapter sees the table transposed). `fail` builds the
/// exception.
template <typename Fail>
void check_against_base(const io::GgufFile& base, const std::string& module, Eigen::Index out,
                        Eigen::Index in, Fail fail) {
  if (!base.contains(module))
    throw fail("the base model \"" + base.source() + "\" has no tensor " + quoted(module));
  const bool embedding = is_token_embedding(module);
  const Eigen::Index ne0 = embedding ? out : in, ne1 = embedding ? in : out;
  const io::GgufTensorInfo& t = base.info(module);
  if (t.ne.size() != 2 || t.ne[0] != ne0 || t.ne[1] != ne1)
    throw fail((embedding ? "the adapter is for a table of " + std::to_string(in) + " tokens x " +
                                std::to_string(out) + " (ne = [n_embd, n_vocab])"
                          : "the adapter is for a " + std::to_string(out) + " x " +
                                std::to_string(in) + " (out x in) weight (ne = [in, out])") +
               ", but the base's " + quoted(module) + " has " + t.shape_string());
}

inline std::string architecture_of(const io::GgufFile& base) {
  if (!base.has("general.architecture"))
    throw FormatError("GGUF: the base model \"" + base.source() + "\" has no general.architecture");
  return base.get<std::string>("general.architecture");
}

}  // namespace detail

// ---- reading ------------------------------------------------------------------------------------

/// Checks and converts an adapter file already parsed (see read_adapter).
template <typename T>
AdapterFile<T> parse_adapter(const io::GgufFile& file, const ReadOptions& options = {}) {
  const std::string& source = file.source();
  auto fail = [&](const std::string& what) {
    return FormatError("GGUF adapter \"" + source + "\": " + what);
  };
  auto string_key = [&](const char* key) -> std::string {
    if (!file.has(key)) throw fail(std::string("metadata \"") + key + "\" is missing");
    const io::GgufValue& v = file.value(key);
    if (v.type() != io::GgufType::String)
      throw fail(std::string("metadata \"") + key + "\" must be a string, got " + v.type_string());
    return v.get<std::string>();
  };
  if (const std::string t = string_key("general.type"); t != "adapter")
    throw fail("general.type is \"" + t + "\", not \"adapter\" (is this a model file?)");
  if (const std::string t = string_key("adapter.type"); t != "lora")
    throw fail("adapter.type is \"" + t + "\"; only \"lora\" adapters are supported");
  AdapterFile<T> out;
  out.architecture = string_key("general.architecture");
  if (options.base != nullptr) {
    const std::string base_arch = detail::architecture_of(*options.base);
    if (base_arch != out.architecture)
      throw fail("it is for the architecture \"" + out.architecture + "\" but the base model \"" +
                 options.base->source() + "\" is \"" + base_arch +
                 "\" (llama.cpp refuses it: \"model arch and LoRA arch mismatch\")");
  }
  if (file.has("adapter.lora.alpha")) {
    const io::GgufValue& v = file.value("adapter.lora.alpha");
    if (v.type() != io::GgufType::F32)
      throw fail("adapter.lora.alpha must be f32, got " + v.type_string() +
                 " (llama.cpp aborts on it)");
    out.alpha = v.get<float>();
    if (!std::isfinite(out.alpha)) throw fail("adapter.lora.alpha is not finite");
  }
  if (file.has("adapter.alora.invocation_tokens"))
    throw fail(
        "it is an activated LoRA (adapter.alora.invocation_tokens), which lora cannot "
        "apply");
  if (file.has(kFoldedModulesKey))
    out.folded_modules = file.get_array<std::string>(kFoldedModulesKey);

  // Pair the tensors as llama.cpp does: by name, "<base>.lora_a" with "<base>.lora_b".
  std::map<std::string, std::pair<const io::GgufTensorInfo*, const io::GgufTensorInfo*>> pairs;
  for (const auto& t : file.tensors()) {
    if (detail::ends_with(t.name, kLoraASuffix)) {
      pairs[t.name.substr(0, t.name.size() - 7)].first = &t;
    } else if (detail::ends_with(t.name, kLoraBSuffix)) {
      pairs[t.name.substr(0, t.name.size() - 7)].second = &t;
    } else if (detail::ends_with(t.name, "_norm.weight")) {
      continue;  // llama.cpp ignores norm tensors in adapters, and so does lora
    } else {
      throw fail("tensor " + detail::quoted(t.name) +
                 " is neither a .lora_a nor a .lora_b tensor (llama.cpp refuses it)");
    }
  }
  if (pairs.empty()) throw fail("it holds no LoRA tensors");
  for (const auto& entry : pairs) {
    // Named copies, not structured bindings: lambdas cannot capture those before C++20.
    const std::string& module = entry.first;
    const auto& ab = entry.second;
    auto mfail = [&](const std::string& what) {
      return fail("module " + detail::quoted(module) + ": " + what);
    };
    if (ab.first == nullptr)
      throw mfail("\"" + module + kLoraBSuffix + "\" has no \"" + module + kLoraASuffix +
                  "\" (half a pair)");
    if (ab.second == nullptr)
      throw mfail("\"" + module + kLoraASuffix + "\" has no \"" + module + kLoraBSuffix +
                  "\" (half a pair)");
    const io::GgufTensorInfo& a = *ab.first;
    const io::GgufTensorInfo& b = *ab.second;
    if (a.ne.size() != 2 || b.ne.size() != 2)
      throw mfail("lora_a and lora_b must be 2-D, got " + a.shape_string() + " and " +
                  b.shape_string());
    // A: ne = [k, r] (token_embd: [r, n_vocab], A transposed); B: ne = [r, d].
    const bool embedding = detail::is_token_embedding(module);
    const std::int64_t k = embedding ? a.ne[1] : a.ne[0], r = embedding ? a.ne[0] : a.ne[1];
    const std::int64_t d = b.ne[1];
    if (b.ne[0] != r)
      throw mfail("lora_a has " + a.shape_string() +
                  (embedding ? " (ne = [r, n_vocab])" : " (ne = [in, r])") + " but lora_b has " +
                  b.shape_string() +
                  " (ne = [r, out]): their ranks differ (llama.cpp: \"lora_a "
                  "tensor is not transposed\")");
    if (r < 1 || k < 1 || d < 1) throw mfail("empty lora_a or lora_b");
    if (r > std::min(k, d))
      throw mfail("rank " + std::to_string(r) + " exceeds min(out, in) of a " + std::to_string(d) +
                  " x " + std::to_string(k) + " weight, which this library does not support");
    if (options.base != nullptr) detail::check_against_base(*options.base, module, d, k, mfail);
    for (const auto* t : {&a, &b})
      if (!io::GgufFile::can_convert(t->type))
        throw mfail("tensor " + detail::quoted(t->name) + " has type " +
                    io::ggml_type_traits(t->type).name +
                    ", which lora cannot read (f32, f16, bf16, q8_0, q4_0, q5_0, q4_K, q5_K, "
                    "q6_K)");
    LoRAConfig cfg;
    cfg.rank = static_cast<int>(r);
    // llama.cpp: scale = alpha / r, or 1 when alpha is 0.
    cfg.alpha = out.alpha != 0 ? static_cast<double>(out.alpha) : static_cast<double>(r);
    LoRAAdapter<T> adapter(d, k, cfg);
    auto A = file.matrix<T>(a.name);        // rows = ne[1], cols = ne[0]: r x k (token_embd: k x r)
    const auto B = file.matrix<T>(b.name);  // rows = d, cols = r
    if (!A.allFinite() || !B.allFinite())
      throw mfail("lora_a or lora_b holds a value that is not finite");
    if (embedding) A.transposeInPlace();
    adapter.set_weights(A, B);
    out.modules.emplace(module, std::move(adapter));
  }
  return out;
}

/// Reads and checks a GGUF LoRA adapter (see the top of this file); with options.base, checks it
/// against the base model as llama.cpp would. Throws FormatError.
template <typename T>
AdapterFile<T> read_adapter(const std::string& path, const ReadOptions& options = {}) {
  return parse_adapter<T>(io::GgufFile::load(path), options);
}

// ---- writing ------------------------------------------------------------------------------------

namespace detail {

/// alpha for the file: the s * r that most modules share (ties: the smallest), 1 when all
/// scalings are 0.
template <typename T>
float choose_alpha(const std::map<std::string, const LoRAAdapter<T>*>& adapters) {
  std::map<float, int> votes;
  for (const auto& [path, a] : adapters) {
    const float p = static_cast<float>(static_cast<double>(a->scaling()) * a->rank());
    if (p != 0 && std::isfinite(p)) ++votes[p];
  }
  float best = 1;
  int most = 0;
  for (const auto& [p, n] : votes)
    if (n > most) {
      best = p;
      most = n;
    }
  return best;
}

}  // namespace detail

/// Builds the GGUF file of `adapters` (base tensor name -> adapter) without writing it; see
/// write_adapter.
template <typename T>
io::GgufWriter adapter_writer(const std::map<std::string, const LoRAAdapter<T>*>& adapters,
                              const SaveOptions& options = {}) {
  auto fail = [](const std::string& what) {
    return std::invalid_argument("GGUF save_adapter: " + what);
  };
  if (adapters.empty()) throw fail("no modules to save");
  std::string arch = options.architecture;
  if (options.base != nullptr) {
    const std::string base_arch = detail::architecture_of(*options.base);
    if (!arch.empty() && arch != base_arch)
      throw fail("SaveOptions::architecture is \"" + arch + "\" but the base model is \"" +
                 base_arch + "\"");
    arch = base_arch;
  }
  if (arch.empty())
    throw fail(
        "the base model's architecture is unknown: set SaveOptions::architecture "
        "(e.g. \"llama\") or SaveOptions::base");
  const io::GgmlType type = options.type;
  if (type != io::GgmlType::F32 && type != io::GgmlType::F16 && type != io::GgmlType::BF16 &&
      type != io::GgmlType::Q8_0)
    throw fail(std::string("adapters are written as f32, f16, bf16 or q8_0, not ") +
               io::ggml_type_traits(type).name);
  for (const auto& entry : adapters) {
    const std::string& module = entry.first;
    const LoRAAdapter<T>* a = entry.second;
    auto mfail = [&](const std::string& what) {
      return fail("module " + detail::quoted(module) + ": " + what);
    };
    if (a == nullptr) throw mfail("the adapter is null");
    if (module.empty()) throw fail("a module name is empty");
    if (module.size() + 7 > io::kGgufMaxNameBytes)
      throw mfail("the name is too long: \"" + module + ".lora_a\" would pass ggml's 63 bytes");
    if (a->config().use_dora)
      throw mfail(
          "it is a DoRA adapter, which llama.cpp's adapter format cannot express (no "
          "magnitude vector): merge it into the base model instead");
    if (a->has_lora_bias())
      throw mfail("it has a lora bias, which llama.cpp's adapter format cannot express");
    const bool embedding = detail::is_token_embedding(module);
    // ggml's rows (ne[0]) hold 32-value blocks: r for B and for token_embd's A^T, k for A.
    if (type == io::GgmlType::Q8_0 &&
        (a->rank() % 32 != 0 || (!embedding && a->in_features() % 32 != 0)))
      throw mfail(std::string("q8_0 needs r") + (embedding ? "" : " and in features") +
                  " to be multiples of 32 (ggml's block), got r = " + std::to_string(a->rank()) +
                  (embedding ? "" : ", in = " + std::to_string(a->in_features())) +
                  "; save it as f16, bf16 or f32");
    if (!a->all_finite()) throw mfail("A or B holds a value that is not finite");
    if (options.base != nullptr) {
      detail::check_against_base(*options.base, module, a->out_features(), a->in_features(), mfail);
      // Without output.weight, llama.cpp multiplies by token_embd for the logits too, but applies
      // the adapter only to the lookup (build_inp_embd).
      if (embedding && !options.base->contains("output.weight"))
        throw mfail(
            "the base has no output.weight: its output head is token_embd itself, and llama.cpp "
            "applies a token_embd adapter to the lookup only, which would untie the two; merge "
            "the adapter into the base instead (LoRAEmbedding::merge)");
    }
  }

  const float alpha = detail::choose_alpha(adapters);
  io::GgufWriter w;
  w.set_value("general.architecture", arch);
  w.set_value("general.type", std::string("adapter"));
  if (!options.name.empty()) w.set_value("general.name", options.name);
  w.set_value("adapter.type", std::string("lora"));
  w.set_value("adapter.lora.alpha", alpha);
  std::vector<std::string> folded;
  for (const auto& [module, a] : adapters) {
    // llama.cpp applies alpha / r (in float); the module needs s: B carries the rest.
    const bool fold = static_cast<float>(static_cast<double>(a->scaling()) * a->rank()) != alpha;
    if (detail::is_token_embedding(module))
      w.add_matrix(module + kLoraASuffix, a->A().transpose(), type);  // k x r -> ne = [r, k]
    else
      w.add_matrix(module + kLoraASuffix, a->A(), type);  // r x k -> ne = [k, r]
    if (!fold) {
      w.add_matrix(module + kLoraBSuffix, a->B(), type);  // d x r -> ne = [r, d]
    } else {
      const double applied = static_cast<double>(alpha / static_cast<float>(a->rank()));
      const double factor = static_cast<double>(a->scaling()) / applied;
      w.add_matrix(module + kLoraBSuffix, (a->B().template cast<double>() * factor).eval(), type);
      folded.push_back(module);
    }
  }
  if (!folded.empty()) w.set(kFoldedModulesKey, io::GgufValue::array(folded));
  return w;
}

/// Writes `adapters` (base tensor name -> adapter) as a GGUF LoRA adapter that llama.cpp loads
/// (`llama-cli -m base.gguf --lora adapter.gguf`), atomically. Throws std::invalid_argument for
/// what llama.cpp's format cannot express (see the top of this file) or a module that does not
/// fit options.base, std::domain_error for a value the type cannot hold, io::WriteError.
template <typename T>
void write_adapter(const std::string& path,
                   const std::map<std::string, const LoRAAdapter<T>*>& adapters,
                   const SaveOptions& options = {}) {
  adapter_writer<T>(adapters, options).save(path);
}

namespace detail {

template <typename T>
void save_refs(const std::string& path, const peft::LayerRefs& layers, const std::string& name,
               const SaveOptions& options) {
  std::map<std::string, const LoRAAdapter<T>*> adapters;
  for (const auto& [module, ref] : layers) adapters.emplace(module, &ref.template adapter<T>(name));
  write_adapter<T>(path, adapters, options);
}

template <typename T>
void load_refs(const std::string& path, const peft::LayerRefs& layers, const std::string& name,
               const ReadOptions& options) {
  for (const auto& [module, ref] : layers)
    if (!ref.is_writable())
      throw std::invalid_argument("GGUF load_adapter: the layer given for " + quoted(module) +
                                  " is const");
  AdapterFile<T> file = read_adapter<T>(path, options);
  for (const auto& [module, adapter] : file.modules) {
    const auto it = layers.find(module);
    if (it == layers.end())
      throw FormatError("GGUF load_adapter: \"" + path + "\" adapts " + quoted(module) +
                        " but no layer was given for it");
    if (it->second.out_features() != adapter.out_features() ||
        it->second.in_features() != adapter.in_features())
      throw FormatError("GGUF load_adapter: \"" + path + "\": module " + quoted(module) +
                        " is for a " + std::to_string(adapter.out_features()) + " x " +
                        std::to_string(adapter.in_features()) + " weight, but its layer is " +
                        std::to_string(it->second.out_features()) + " x " +
                        std::to_string(it->second.in_features()));
  }
  for (const auto& [module, ref] : layers) {
    if (file.modules.count(module) == 0)
      throw FormatError("GGUF load_adapter: a layer was given for " + quoted(module) + " but \"" +
                        path + "\" has no tensors for it");
    if (ref.is_multi())
      lora::detail::require(!ref.template has_adapter<T>(name),
                            "GGUF load_adapter: the layer of \"", module,
                            "\" already has an adapter named \"", name, "\"");
    else
      lora::detail::require_state(!ref.is_merged(), "GGUF load_adapter: the layer of \"", module,
                                  "\" is merged; unmerge it first");
  }
  for (auto& [module, adapter] : file.modules)
    layers.at(module).template put_adapter<T>(std::move(adapter), name);
}

}  // namespace detail

/// Saves the adapters of layers (base tensor name -> LoRALinear*), e.g.
/// `lora::gguf::save_adapter("a.gguf", {{"blk.0.attn_q.weight", &q}}, {"llama"})`; see
/// write_adapter.
inline void save_adapter(const std::string& path, const peft::LayerRefs& layers,
                         const SaveOptions& options) {
  peft::detail::check_refs(layers, "GGUF save_adapter", false)
      ? detail::save_refs<float>(path, layers, {}, options)
      : detail::save_refs<double>(path, layers, {}, options);
}

/// Saves adapter `name` of MultiLoRALinear layers; see write_adapter.
inline void save_adapter(const std::string& path, const peft::LayerRefs& layers,
                         const std::string& name, const SaveOptions& options) {
  peft::detail::check_refs(layers, "GGUF save_adapter", true)
      ? detail::save_refs<float>(path, layers, name, options)
      : detail::save_refs<double>(path, layers, name, options);
}

/// Loads a GGUF adapter into LoRALinear layers (base tensor name -> layer): each layer's adapter
/// is replaced. All-or-nothing: a module without a layer, a layer without a module or a shape
/// mismatch throws FormatError before any layer changes; a merged layer std::logic_error.
inline void load_adapter(const std::string& path, const peft::LayerRefs& layers,
                         const ReadOptions& options = {}) {
  peft::detail::check_refs(layers, "GGUF load_adapter", false)
      ? detail::load_refs<float>(path, layers, {}, options)
      : detail::load_refs<double>(path, layers, {}, options);
}

/// Loads a GGUF adapter into MultiLoRALinear layers as the adapter `name`; as above.
inline void load_adapter(const std::string& path, const peft::LayerRefs& layers,
                         const std::string& name, const ReadOptions& options = {}) {
  peft::detail::check_refs(layers, "GGUF load_adapter", true)
      ? detail::load_refs<float>(path, layers, name, options)
      : detail::load_refs<double>(path, layers, name, options);
}

/// Builds one LoRALinear<T, Frozen> per module of the adapter at `path`, W0 read from `base` (the
/// GGUF model, checked as llama.cpp would), each carrying the file's adapter.
///
/// `Frozen` is the storage of each W0, built as `Frozen(W0, storage_args...)` from the weight
/// dequantized to T (DenseFrozenWeight<T> by default; Nf4FrozenWeight, Bf16FrozenWeight, ...),
/// except GgmlFrozenWeight, which keeps the base's blocks as stored: on a Q4_K_M file,
/// `make_layers<float, GgmlFrozenWeight>(path, base)` trains against exactly the weights llama.cpp
/// serves, with no full-precision copy (storage_args: its MergeMode and GgmlBackend).
/// A token_embd module is std::invalid_argument: it is not a linear layer (read_adapter gives its
/// adapter, for a LoRAEmbedding's replace_adapter).
template <typename T, typename Frozen = DenseFrozenWeight<T>, typename... StorageArgs>
std::map<std::string, LoRALinear<T, Frozen>> make_layers(const std::string& path,
                                                         const io::GgufFile& base,
                                                         const StorageArgs&... storage_args) {
  ReadOptions options;
  options.base = &base;
  AdapterFile<T> file = read_adapter<T>(path, options);
  for (const auto& entry : file.modules)
    if (detail::is_token_embedding(entry.first))
      throw std::invalid_argument("GGUF make_layers: \"" + path + "\" adapts " +
                                  detail::quoted(entry.first) +
                                  ", a token embedding, not a linear layer: read it with "
                                  "read_adapter and give it to a LoRAEmbedding (replace_adapter)");
  std::map<std::string, LoRALinear<T, Frozen>> layers;
  for (auto& [module, adapter] : file.modules) {
    LoRALinear<T, Frozen> layer(detail::read_storage<T, Frozen>(base, module, storage_args...),
                                typename LoRALinear<T, Frozen>::Vector(), adapter.config());
    layer.replace_adapter(adapter);
    layers.emplace(module, std::move(layer));
  }
  return layers;
}

}  // namespace lora::gguf
