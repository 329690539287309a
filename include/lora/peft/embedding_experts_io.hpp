// PEFT adapter files for token embeddings and expert weights: the keys PEFT's
// get_peft_model_state_dict writes (the adapter name removed from the module's state dict):
//   base_model.model.<module>.lora_embedding_A      r x num_embeddings   (nn.Parameter: no
//   base_model.model.<module>.lora_embedding_B      dim x r               ".weight" suffix)
// for an adapted nn.Embedding at <module> (listed in target_modules), and
//   base_model.model.<module>.lora_A.weight         (r E) x in
//   base_model.model.<module>.lora_B.weight         out x (r E)
// for an expert parameter <module>.<name> (listed in target_parameters): PEFT's ParamWrapper takes
// the place of the module that owns the parameter, and its lora_A / lora_B are nn.Linear. (PEFT
// nests a second ParamWrapper for a second parameter of the same module, whose keys then gain
// ".base_layer": one adapted parameter per module is what these files hold.)
//
// A GGUF writer reads the same A and B: llama.cpp's converter stores token_embd's lora_a as
// lora_embedding_A transposed (ne = [r, n_vocab]) and lora_b as lora_embedding_B (ne = [r,
// n_embd]).
#pragma once

#include "lora/detail/compiled_mode.hpp"
#include "lora/io/atomic_file.hpp"
#include "lora/io/format_error.hpp"
#include "lora/io/safetensors.hpp"
#include "lora/io/safetensors_writer.hpp"
#include "lora/lora_embedding.hpp"
#include "lora/lora_experts.hpp"
#include "lora/peft/adapter_config.hpp"
#include "lora/peft/adapter_io.hpp"

#include <Eigen/Core>

#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora::peft {

namespace detail {

/// "<module>" of the parameter path "<module>.<name>" (PEFT's ParamWrapper sits at <module>).
LORA_FUNC std::string owner_module(const std::string& parameter);

#if LORA_WITH_BODIES

LORA_FUNC std::string owner_module(const std::string& parameter) {
  const auto dot = parameter.rfind('.');
  if (dot == std::string::npos || dot == 0 || dot + 1 == parameter.size())
    throw std::invalid_argument("peft: expert parameter path " + io::quote_for_message(parameter) +
                                " must be <module>.<parameter name>");
  return parameter.substr(0, dot);
}

#endif  // LORA_WITH_BODIES

}  // namespace detail

/// Writes the active adapters of `embeddings` (module path -> layer) and `experts` (parameter path
/// "<module>.<name>" -> layer) as a PEFT adapter directory: PEFT's keys (see the top of this file),
/// adapter_config.json with target_modules = the embedding modules and target_parameters = the
/// expert parameters. Every layer's adapter must share one rank and one alpha
/// (std::invalid_argument otherwise); a non-finite weight is std::domain_error; nothing is written
/// until both files are built. Returns the config written.
template <typename T, typename FE, typename FX>
AdapterConfig save_embedding_experts(
    const std::string& dir, const std::map<std::string, const LoRAEmbedding<T, FE>*>& embeddings,
    const std::map<std::string, const LoRAExperts<T, FX>*>& experts,
    io::DType dtype = std::is_same_v<T, double> ? io::DType::F64 : io::DType::F32) {
  if (embeddings.empty() && experts.empty())
    throw std::invalid_argument("save_embedding_experts: no layers to save");
  std::optional<LoRAConfig> shared;
  auto agree = [&](const std::string& path, const LoRAConfig& c) {
    if (!shared) shared = c;
    if (c.rank != shared->rank || c.alpha != shared->alpha || c.use_rslora != shared->use_rslora)
      throw std::invalid_argument("save_embedding_experts: " + io::quote_for_message(path) +
                                  " has rank " + std::to_string(c.rank) + " and alpha " +
                                  std::to_string(c.alpha) +
                                  "; every layer must share one rank "
                                  "and alpha here");
  };
  io::SafeTensorsWriter w;
  w.set_metadata("format", "pt");
  AdapterConfig config;
  nlohmann::json parameters = nlohmann::json::array();
  std::set<std::string> owners;
  for (const auto& [path, layer] : embeddings) {
    if (layer == nullptr) throw std::invalid_argument("save_embedding_experts: null layer");
    const auto& a = layer->active_adapter();
    agree(path, a.config());
    detail::require_finite_for_save(key_of(path, "lora_embedding_A"), a.A());
    detail::require_finite_for_save(key_of(path, "lora_embedding_B"), a.B());
    w.add(key_of(path, "lora_embedding_A"), a.A(), dtype);
    w.add(key_of(path, "lora_embedding_B"), a.B(), dtype);
    config.target_modules.push_back(path);
  }
  for (const auto& [path, layer] : experts) {
    if (layer == nullptr) throw std::invalid_argument("save_embedding_experts: null layer");
    const std::string module = detail::owner_module(path);
    if (!owners.insert(module).second || embeddings.count(module))
      throw std::invalid_argument("save_embedding_experts: module " +
                                  io::quote_for_message(module) +
                                  " is adapted twice (one adapted parameter per module)");
    const std::string name = layer->active_name();
    agree(path, layer->expert(0).adapter(name).config());
    const auto A = layer->A(name);
    const auto B = layer->B(name);
    detail::require_finite_for_save(key_of(module, "lora_A.weight"), A);
    detail::require_finite_for_save(key_of(module, "lora_B.weight"), B);
    w.add(key_of(module, "lora_A.weight"), A, dtype);
    w.add(key_of(module, "lora_B.weight"), B, dtype);
    parameters.push_back(path);
  }
  config.r = shared->rank;
  config.lora_alpha = shared->alpha;
  config.use_rslora = shared->use_rslora;
  config.original = nlohmann::ordered_json::object();
  if (!parameters.empty()) config.original["target_parameters"] = parameters;
  const std::vector<std::uint8_t> weights = w.serialize();
  const std::string text = config.dump();
  detail::make_directories(dir);
  io::write_file_atomically(detail::join_path(dir, kWeightsFileName), weights.data(),
                            weights.size());
  io::write_file_atomically(detail::join_path(dir, kConfigFileName), text);
  return config;
}

/// Loads a PEFT adapter directory written for token embeddings and expert parameters (by PEFT or
/// save_embedding_experts) into the layers: each embedding's active adapter and each experts
/// layer's active adapter are replaced (rank and scaling as the config says). All or nothing: a
/// missing or stray tensor, a shape that does not fit, a module the config does not target, a
/// non-finite weight, each throws FormatError before any layer changes; a merged layer is
/// std::logic_error. Returns the config read.
template <typename T, typename FE, typename FX>
AdapterConfig load_embedding_experts(const std::string& dir,
                                     const std::map<std::string, LoRAEmbedding<T, FE>*>& embeddings,
                                     const std::map<std::string, LoRAExperts<T, FX>*>& experts) {
  const std::string config_path = detail::join_path(dir, kConfigFileName);
  AdapterConfig config = AdapterConfig::load(config_path);
  config.require_supported(config_path);
  const auto st = io::SafeTensors::load(detail::join_path(dir, kWeightsFileName));
  auto fail = [&](const std::string& what) {
    return FormatError("PEFT adapter \"" + dir + "\": " + what);
  };
  if (config.use_dora || config.lora_bias)
    throw fail("use_dora and lora_bias are not supported for embeddings and expert parameters");
  std::set<std::string> targeted_parameters;
  if (config.original.contains("target_parameters") &&
      config.original.at("target_parameters").is_array())
    for (const auto& p : config.original.at("target_parameters"))
      if (p.is_string()) targeted_parameters.insert(p.get<std::string>());
  auto parameter_targeted = [&](const std::string& path) {
    for (const auto& t : targeted_parameters)
      if (path == t || (path.size() > t.size() &&
                        path.compare(path.size() - t.size() - 1, t.size() + 1, "." + t) == 0))
        return true;
    return false;
  };
  std::set<std::string> used;
  auto matrix = [&](const std::string& key, Eigen::Index rows, Eigen::Index cols) {
    if (!st.contains(key)) throw fail(io::quote_for_message(key) + " is missing");
    const auto& shape = st.info(key).shape;
    if (shape.size() != 2 || shape[0] != rows || shape[1] != cols)
      throw fail(io::quote_for_message(key) + " has shape " + io::shape_to_string(shape) +
                 ", expected [" + std::to_string(rows) + ", " + std::to_string(cols) + "]");
    auto m = st.matrix<T>(key);
    detail::require_finite_tensor<T>(st, key, m, dir);
    used.insert(key);
    return m;
  };
  auto rank_of = [&](const std::string& key) -> Eigen::Index {
    if (!st.contains(key)) throw fail(io::quote_for_message(key) + " is missing");
    const auto& shape = st.info(key).shape;
    if (shape.size() != 2) throw fail(io::quote_for_message(key) + " must be 2-D");
    return static_cast<Eigen::Index>(shape[0]);
  };
  std::vector<std::pair<LoRAEmbedding<T, FE>*, LoRAAdapter<T>>> new_embeddings;
  for (const auto& [path, layer] : embeddings) {
    if (!config.targets(path))
      throw fail("module " + io::quote_for_message(path) + " is not selected by target_modules");
    const LoRAConfig cfg = config.lora_config_for(path);
    const auto A = matrix(key_of(path, "lora_embedding_A"), cfg.rank, layer->num_embeddings());
    const auto B = matrix(key_of(path, "lora_embedding_B"), layer->embedding_dim(), cfg.rank);
    LoRAAdapter<T> a(layer->embedding_dim(), layer->num_embeddings(), cfg);
    a.set_weights(A, B);
    new_embeddings.emplace_back(layer, std::move(a));
  }
  struct ExpertUpdate {
    LoRAExperts<T, FX>* layer;
    LoRAConfig config;
    typename LoRAExperts<T, FX>::Matrix A, B;
  };
  std::vector<ExpertUpdate> new_experts;
  for (const auto& [path, layer] : experts) {
    if (!parameter_targeted(path))
      throw fail("parameter " + io::quote_for_message(path) +
                 " is not selected by target_parameters");
    const std::string module = detail::owner_module(path);
    const LoRAConfig cfg = config.lora_config_for(module);
    const Eigen::Index rE = rank_of(key_of(module, "lora_A.weight"));
    if (rE != cfg.rank * layer->num_experts())
      throw fail(io::quote_for_message(key_of(module, "lora_A.weight")) + " has " +
                 std::to_string(rE) + " rows; rank " + std::to_string(cfg.rank) + " times " +
                 std::to_string(layer->num_experts()) + " experts expected");
    auto A = matrix(key_of(module, "lora_A.weight"), rE, layer->in_features());
    auto B = matrix(key_of(module, "lora_B.weight"), layer->out_features(), rE);
    new_experts.push_back({layer, cfg, std::move(A), std::move(B)});
  }
  for (const auto& key : st.names())
    if (!used.count(key))
      throw fail("tensor " + io::quote_for_message(key) + " belongs to no layer given");
  for (const auto& [layer, a] : new_embeddings)
    lora::detail::require_state(!layer->is_merged(),
                                "load_embedding_experts: a layer is merged; "
                                "call unmerge() first");
  for (const auto& u : new_experts)
    lora::detail::require_state(!u.layer->is_merged(),
                                "load_embedding_experts: a layer is "
                                "merged; call unmerge() first");
  for (auto& [layer, a] : new_embeddings) layer->replace_adapter(layer->active_name(), a);
  for (auto& u : new_experts) u.layer->replace_adapter(u.layer->active_name(), u.config, u.A, u.B);
  return config;
}

}  // namespace lora::peft
