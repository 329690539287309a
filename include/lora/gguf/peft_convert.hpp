// PEFT <-> GGUF adapters for the llama family, replacing llama.cpp's convert_lora_to_gguf.py for
// these models (and going back, which it does not).
//
// Names: PEFT's module paths (without "base_model.model.") become the base model's tensors:
//   model.layers.N.self_attn.{q,k,v,o}_proj  ->  blk.N.attn_{q,k,v,output}.weight
//   model.layers.N.mlp.{gate,up,down}_proj   ->  blk.N.ffn_{gate,up,down}.weight
//   lm_head                                  ->  output.weight
// (model.embed_tokens -> token_embd.weight is refused here: these convert linear modules. An
// embedding adapter goes through a LoRAEmbedding: peft::load_embedding_experts, then
// gguf::write_adapter under "token_embd.weight", which lays it out as llama.cpp's converter does.)
//
// The trap: llama.cpp's HF converter stores q_proj and k_proj with their rows permuted per head,
// for its rotary layout: W' = P W with, per head of hd = d / n_head rows,
//   W'[h hd + 2 j + i] = W[h hd + i hd/2 + j]      (i in {0, 1}, j < hd / 2)
// (reshape(n_head, 2, hd/2, k).swapaxes(1, 2) in convert_hf_to_gguf.py; n_head_kv heads for k).
// Since P (W + s B A) = P W + s (P B) A, an adapter for the GGUF model needs B's rows permuted the
// same way, and A unchanged. The head counts come from the base model's metadata.
#pragma once

#include "lora/gguf/adapter_io.hpp"
#include "lora/io/gguf.hpp"
#include "lora/peft.hpp"

#include <Eigen/Core>

#include <cstdint>
#include <map>
#include <optional>
#include <regex>
#include <stdexcept>
#include <string>
#include <utility>

namespace lora::gguf {

/// The GGUF tensor of a PEFT module path of the llama family ("model.layers.3.self_attn.q_proj"
/// -> "blk.3.attn_q.weight"), or nothing for a path it does not know.
inline std::optional<std::string> peft_to_gguf_name(const std::string& module) {
  if (module == "lm_head") return std::string("output.weight");
  if (module == "model.embed_tokens") return std::string("token_embd.weight");
  static const std::regex layer(R"(model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+))");
  std::smatch m;
  if (!std::regex_match(module, m, layer)) return std::nullopt;
  static const std::map<std::string, std::string> names{
      {"self_attn.q_proj", "attn_q"}, {"self_attn.k_proj", "attn_k"},
      {"self_attn.v_proj", "attn_v"}, {"self_attn.o_proj", "attn_output"},
      {"mlp.gate_proj", "ffn_gate"},  {"mlp.up_proj", "ffn_up"},
      {"mlp.down_proj", "ffn_down"}};
  const auto it = names.find(m[2].str() + "." + m[3].str());
  if (it == names.end()) return std::nullopt;
  return "blk." + m[1].str() + "." + it->second + ".weight";
}

/// The PEFT module path of a GGUF tensor of the llama family ("blk.3.attn_q.weight" ->
/// "model.layers.3.self_attn.q_proj"), or nothing for a name it does not know.
inline std::optional<std::string> gguf_to_peft_name(const std::string& tensor) {
  if (tensor == "output.weight") return std::string("lm_head");
  if (tensor == "token_embd.weight") return std::string("model.embed_tokens");
  static const std::regex block(R"(blk\.(\d+)\.(\w+)\.weight)");
  std::smatch m;
  if (!std::regex_match(tensor, m, block)) return std::nullopt;
  static const std::map<std::string, std::string> names{
      {"attn_q", "self_attn.q_proj"}, {"attn_k", "self_attn.k_proj"},
      {"attn_v", "self_attn.v_proj"}, {"attn_output", "self_attn.o_proj"},
      {"ffn_gate", "mlp.gate_proj"},  {"ffn_up", "mlp.up_proj"},
      {"ffn_down", "mlp.down_proj"}};
  const auto it = names.find(m[2].str());
  if (it == names.end()) return std::nullopt;
  return "model.layers." + m[1].str() + "." + it->second;
}

/// The attention head counts of a llama-family base model (from `<arch>.attention.head_count`
/// and `<arch>.attention.head_count_kv`, u32; the latter defaults to the former).
struct HeadCounts {
  int n_head = 0;     ///< query heads
  int n_head_kv = 0;  ///< key/value heads
};

/// The head counts of `base`; throws io::FormatError when they are missing or not u32.
inline HeadCounts head_counts(const io::GgufFile& base) {
  const std::string arch = detail::architecture_of(base);
  HeadCounts h;
  h.n_head = static_cast<int>(base.get<std::uint32_t>(arch + ".attention.head_count"));
  h.n_head_kv = static_cast<int>(base.get_or<std::uint32_t>(arch + ".attention.head_count_kv",
                                                            static_cast<std::uint32_t>(h.n_head)));
  if (h.n_head < 1 || h.n_head_kv < 1)
    throw io::FormatError("GGUF: \"" + base.source() + "\": head counts must be at least 1");
  return h;
}

/// The rows of M permuted as llama.cpp's HF converter permutes q_proj/k_proj for `n_head` heads
/// (see the top of this file): out.row(h hd + 2 j + i) = M.row(h hd + i hd/2 + j). Throws
/// std::invalid_argument unless the rows split into n_head heads of an even size.
template <typename Derived>
Eigen::Matrix<typename Derived::Scalar, Eigen::Dynamic, Eigen::Dynamic> rope_permute_rows(
    const Eigen::MatrixBase<Derived>& M, int n_head, bool inverse = false) {
  const Eigen::Index d = M.rows();
  if (n_head < 1 || d % n_head != 0 || (d / n_head) % 2 != 0)
    throw std::invalid_argument("rope_permute_rows: " + std::to_string(d) +
                                " rows do not split into " + std::to_string(n_head) +
                                " heads of an even size");
  const Eigen::Index hd = d / n_head, half = hd / 2;
  Eigen::Matrix<typename Derived::Scalar, Eigen::Dynamic, Eigen::Dynamic> out(d, M.cols());
  for (Eigen::Index h = 0; h < n_head; ++h)
    for (Eigen::Index j = 0; j < half; ++j)
      for (Eigen::Index i = 0; i < 2; ++i) {
        const Eigen::Index permuted = h * hd + 2 * j + i, original = h * hd + i * half + j;
        if (inverse)
          out.row(original) = M.row(permuted);
        else
          out.row(permuted) = M.row(original);
      }
  return out;
}

namespace detail {

inline void require_llama(const io::GgufFile& base, const char* who) {
  const std::string arch = architecture_of(base);
  if (arch != "llama")
    throw std::invalid_argument(std::string(who) + ": the base model's architecture is \"" + arch +
                                "\"; only the llama family (\"llama\") is converted");
}

/// The number of heads whose layout the tensor's rows follow: n_head for attn_q, n_head_kv for
/// attn_k, 0 for a tensor that is not permuted.
inline int permuted_heads(const std::string& tensor, const HeadCounts& h) {
  const auto ends = [&](const char* s) { return detail::ends_with(tensor, s); };
  if (ends(".attn_q.weight")) return h.n_head;
  if (ends(".attn_k.weight")) return h.n_head_kv;
  return 0;
}

}  // namespace detail

/// PEFT adapters (module path -> adapter, as peft::read_adapter gives them) as adapters of the
/// GGUF base model's tensors (base tensor name -> adapter): names mapped, B of q_proj/k_proj
/// row-permuted. Throws std::invalid_argument for a module without a GGUF name, an embedding
/// adapter or a base of another family; FormatError when a module does not fit the base.
template <typename T>
std::map<std::string, LoRAAdapter<T>> peft_to_gguf(
    const std::map<std::string, LoRAAdapter<T>>& modules, const io::GgufFile& base) {
  detail::require_llama(base, "peft_to_gguf");
  const HeadCounts heads = head_counts(base);
  std::map<std::string, LoRAAdapter<T>> out;
  for (const auto& entry : modules) {
    const std::string& path = entry.first;  // not a structured binding: the lambda captures it
    const LoRAAdapter<T>& adapter = entry.second;
    const auto name = peft_to_gguf_name(path);
    if (!name)
      throw std::invalid_argument("peft_to_gguf: module " + detail::quoted(path) +
                                  " has no llama.cpp name (known: model.layers.N.self_attn."
                                  "{q,k,v,o}_proj, model.layers.N.mlp.{gate,up,down}_proj, "
                                  "lm_head)");
    if (*name == "token_embd.weight")
      throw std::invalid_argument(
          "peft_to_gguf: " + path +
          " is an embedding, and this converts linear modules: load it into a LoRAEmbedding "
          "(peft::load_embedding_experts) and write that with gguf::write_adapter");
    detail::check_against_base(
        base, *name, adapter.out_features(), adapter.in_features(), [&](const std::string& what) {
          return FormatError("peft_to_gguf: module " + detail::quoted(path) + ": " + what);
        });
    LoRAAdapter<T> converted = adapter;
    if (const int n = detail::permuted_heads(*name, heads); n > 0)
      converted.set_weights(adapter.A(), rope_permute_rows(adapter.B(), n));
    out.emplace(*name, std::move(converted));
  }
  return out;
}

/// The inverse of peft_to_gguf: adapters of GGUF tensors back to PEFT module paths, B of
/// attn_q/attn_k row-permuted back.
template <typename T>
std::map<std::string, LoRAAdapter<T>> gguf_to_peft(
    const std::map<std::string, LoRAAdapter<T>>& modules, const io::GgufFile& base) {
  detail::require_llama(base, "gguf_to_peft");
  const HeadCounts heads = head_counts(base);
  std::map<std::string, LoRAAdapter<T>> out;
  for (const auto& [tensor, adapter] : modules) {
    const auto path = gguf_to_peft_name(tensor);
    if (!path || tensor == "token_embd.weight")
      throw std::invalid_argument("gguf_to_peft: tensor " + detail::quoted(tensor) +
                                  " has no PEFT module path lora knows");
    LoRAAdapter<T> converted = adapter;
    if (const int n = detail::permuted_heads(tensor, heads); n > 0)
      converted.set_weights(adapter.A(), rope_permute_rows(adapter.B(), n, true));
    out.emplace(*path, std::move(converted));
  }
  return out;
}

/// Converts the PEFT adapter directory `peft_dir` into the GGUF adapter `out_path` for the base
/// model `base` (checked against it as llama.cpp would), tensors of `type`.
inline void convert_peft_to_gguf(const std::string& peft_dir, const io::GgufFile& base,
                                 const std::string& out_path,
                                 io::GgmlType type = io::GgmlType::F32) {
  const peft::AdapterFile<double> in = peft::read_adapter<double>(peft_dir);
  const auto converted = peft_to_gguf(in.modules, base);
  std::map<std::string, const LoRAAdapter<double>*> pointers;
  for (const auto& [name, a] : converted) pointers.emplace(name, &a);
  SaveOptions options;
  options.base = &base;
  options.type = type;
  write_adapter<double>(out_path, pointers, options);
}

/// Converts the GGUF adapter `gguf_path` (for the base model `base`) into the PEFT adapter
/// directory `out_dir` (f32 tensors).
inline void convert_gguf_to_peft(const std::string& gguf_path, const io::GgufFile& base,
                                 const std::string& out_dir) {
  ReadOptions read;
  read.base = &base;
  const AdapterFile<double> in = read_adapter<double>(gguf_path, read);
  const auto converted = gguf_to_peft(in.modules, base);
  std::map<std::string, const LoRAAdapter<double>*> pointers;
  for (const auto& [path, a] : converted) pointers.emplace(path, &a);
  peft::SaveOptions options;
  options.dtype = io::DType::F32;
  peft::write_adapter<double>(out_dir, pointers, options);
}

}  // namespace lora::gguf
