// lora::peft::AdapterConfig: the fields of a PEFT `adapter_config.json` (LoraConfig) that decide
// how an adapter is applied, and PEFT's rules for them: per-module rank and alpha from
// `rank_pattern` / `alpha_pattern`, and which modules `target_modules` selects.
#pragma once

#include "lora/config.hpp"
#include "lora/io/safetensors.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <optional>
#include <regex>
#include <string>
#include <utility>
#include <vector>

namespace lora::peft {

using io::FormatError;

/// The PEFT LoRA settings of one adapter (PEFT's defaults where the file leaves a field out).
struct AdapterConfig {
  std::string peft_type = "LORA";  ///< must be "LORA"
  int r = 8;                       ///< default rank
  double lora_alpha = 8.0;         ///< default alpha
  bool use_rslora = false;         ///< scaling alpha / sqrt(r) instead of alpha / r
  /// target_modules as a list: a module is targeted when its path equals an entry or ends with
  /// "." + entry. Empty with no regex: the file did not say (null), nothing is checked.
  std::vector<std::string> target_modules;
  /// target_modules as a single string: a regular expression the whole module path must match.
  std::optional<std::string> target_modules_regex;
  /// Per-module rank and alpha overrides, in the file's order: the first key that matches a
  /// module wins (PEFT's get_pattern_key).
  std::vector<std::pair<std::string, int>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;  ///< as rank_pattern, for alpha
  bool fan_in_fan_out = false;  ///< the base layer stores W0 as in x out (GPT-2's Conv1D)
  std::string bias = "none";    ///< which base biases PEFT trains: only "none" is supported
  bool lora_bias = false;       ///< each lora_B carries a bias (`lora_B.bias`, length out)
  bool use_dora = false;  ///< DoRA: each module also has a `lora_magnitude_vector` (length out)
  std::vector<std::string> modules_to_save;  ///< fully trained modules: not supported
  /// The file as read (empty for a config built in code): its other fields are written back
  /// unchanged by to_json.
  nlohmann::ordered_json original;

  // ---- reading ---------------------------------------------------------------------------------

  /// Parses a LoraConfig JSON object. Throws FormatError for a field of the wrong type or value.
  static AdapterConfig from_json(const nlohmann::ordered_json& j,
                                 const std::string& source = "adapter_config.json") {
    auto fail = [&source](const std::string& what) -> FormatError {
      return FormatError("adapter config \"" + source + "\": " + what);
    };
    if (!j.is_object()) throw fail("must be a JSON object, got " + std::string(j.type_name()));
    AdapterConfig c;
    c.original = j;
    auto has = [&j](const char* key) { return j.contains(key) && !j.at(key).is_null(); };
    auto get_bool = [&](const char* key, bool& out) {
      if (!has(key)) return;
      if (!j.at(key).is_boolean()) throw fail(std::string(key) + " must be true or false");
      out = j.at(key).get<bool>();
    };
    auto get_string = [&](const char* key, std::string& out) {
      if (!has(key)) return;
      if (!j.at(key).is_string()) throw fail(std::string(key) + " must be a string");
      out = j.at(key).get<std::string>();
    };
    auto get_rank = [&](const nlohmann::ordered_json& v, const std::string& what) {
      if (!v.is_number_integer() || v.get<long long>() < 1 || v.get<long long>() > (1 << 30))
        throw fail(what + " must be a positive integer, got " + v.dump());
      return static_cast<int>(v.get<long long>());
    };
    auto get_alpha = [&](const nlohmann::ordered_json& v, const std::string& what) {
      if (!v.is_number() || !std::isfinite(v.get<double>()))
        throw fail(what + " must be a finite number, got " + v.dump());
      return v.get<double>();
    };
    auto get_string_list = [&](const char* key, std::vector<std::string>& out) {
      for (const auto& e : j.at(key)) {
        if (!e.is_string()) throw fail(std::string(key) + " entries must be strings");
        out.push_back(e.get<std::string>());
      }
    };

    if (!j.contains("peft_type")) throw fail("peft_type is missing");
    get_string("peft_type", c.peft_type);
    if (has("r")) c.r = get_rank(j.at("r"), "r");
    if (has("lora_alpha")) c.lora_alpha = get_alpha(j.at("lora_alpha"), "lora_alpha");
    get_bool("use_rslora", c.use_rslora);
    get_bool("fan_in_fan_out", c.fan_in_fan_out);
    get_string("bias", c.bias);
    get_bool("lora_bias", c.lora_bias);
    get_bool("use_dora", c.use_dora);
    if (has("target_modules")) {
      const auto& t = j.at("target_modules");
      if (t.is_string()) {
        c.target_modules_regex = t.get<std::string>();
        compile(*c.target_modules_regex, "target_modules", source);
      } else if (t.is_array()) {
        get_string_list("target_modules", c.target_modules);
      } else {
        throw fail("target_modules must be a list of names or a regex string, got " + t.dump());
      }
    }
    if (has("modules_to_save")) {
      if (!j.at("modules_to_save").is_array()) throw fail("modules_to_save must be a list");
      get_string_list("modules_to_save", c.modules_to_save);
    }
    for (const char* key : {"rank_pattern", "alpha_pattern"}) {
      if (!has(key)) continue;
      if (!j.at(key).is_object()) throw fail(std::string(key) + " must be an object");
      for (const auto& [k, v] : j.at(key).items()) {
        const std::string what = std::string(key) + "[\"" + k + "\"]";
        if (k.size() > 1024)
          throw fail(what.substr(0, 40) + "...: keys are limited to 1024 characters");
        compile(k, what, source);
        if (key[0] == 'r')
          c.rank_pattern.emplace_back(k, get_rank(v, what));
        else
          c.alpha_pattern.emplace_back(k, get_alpha(v, what));
      }
    }
    return c;
  }

  /// The deepest nesting load() accepts.
  static constexpr int kMaxConfigDepth = 64;

  /// Reads `path` (an adapter_config.json). Throws FormatError when it cannot be read or parsed.
  static AdapterConfig load(const std::string& path) {
    std::ifstream in(path);
    if (!in) throw FormatError("adapter config: cannot open \"" + path + "\" for reading");
    nlohmann::ordered_json j;
    try {
      // Real configs nest 3 levels deep. Refuse deeper ones while parsing (the parser itself is
      // iterative): json::dump() recurses once per level, so a hostile `[[[[...` value would
      // overflow the stack later, in an error message or in save_adapter.
      j = nlohmann::ordered_json::parse(
          in, [&path](int depth, nlohmann::ordered_json::parse_event_t, nlohmann::ordered_json&) {
            if (depth > kMaxConfigDepth)
              throw FormatError("adapter config \"" + path + "\" nests deeper than " +
                                std::to_string(kMaxConfigDepth) + " levels");
            return true;
          });
    } catch (const nlohmann::json::exception& e) {
      throw FormatError("adapter config \"" + path + "\" is not valid JSON: " + e.what());
    }
    return from_json(j, path);
  }

  /// Throws FormatError naming the setting when the adapter needs something this library does not
  /// implement: another PEFT method, modules_to_save, trained base biases, or DoRA with lora_bias
  /// (which PEFT refuses too).
  void require_supported(const std::string& source = "adapter_config.json") const {
    auto refuse = [&source](const std::string& what) {
      throw FormatError("adapter config \"" + source + "\": " + what);
    };
    if (peft_type != "LORA")
      refuse("peft_type is \"" + peft_type + "\"; only LoRA adapters (\"LORA\") can be applied");
    if (use_dora && lora_bias)
      refuse("use_dora (DoRA) and lora_bias are both true; PEFT does not support that combination");
    if (!modules_to_save.empty())
      refuse("modules_to_save lists " + std::to_string(modules_to_save.size()) +
             " fully trained module(s) (first: \"" + modules_to_save.front() +
             "\"); only LoRA factors can be applied, not replaced modules");
    if (bias != "none")
      refuse("bias is \"" + bias +
             "\"; only \"none\" is supported (the file would carry trained base biases)");
  }

  // ---- PEFT's per-module rules -----------------------------------------------------------------

  /// PEFT's get_pattern_key: the first key k (in file order) with the regex (.*[.])?(k) matching
  /// the whole module path, or nothing. Keys are regular expressions, as in PEFT.
  template <typename V>
  static std::optional<std::string> pattern_key(const std::vector<std::pair<std::string, V>>& p,
                                                const std::string& module) {
    for (const auto& [key, value] : p)
      if (std::regex_match(module, compile("(.*\\.)?(" + key + ")", key, "pattern"))) return key;
    return std::nullopt;
  }

  /// The rank PEFT gives `module`: rank_pattern's matching entry, else r.
  int rank_for(const std::string& module) const {
    const auto key = pattern_key(rank_pattern, module);
    return key ? lookup(rank_pattern, *key) : r;
  }

  /// The alpha PEFT gives `module`: alpha_pattern's matching entry, else lora_alpha.
  double alpha_for(const std::string& module) const {
    const auto key = pattern_key(alpha_pattern, module);
    return key ? lookup(alpha_pattern, *key) : lora_alpha;
  }

  /// The LoRAConfig of `module`: its rank, alpha and use_rslora (scaling alpha/r or alpha/sqrt r).
  LoRAConfig lora_config_for(const std::string& module) const {
    LoRAConfig c;
    c.rank = rank_for(module);
    c.alpha = alpha_for(module);
    c.use_rslora = use_rslora;
    c.use_dora = use_dora;
    return c;
  }

  /// True when target_modules selects `module` (always true when the file gave none).
  bool targets(const std::string& module) const {
    // "all-linear" is a PEFT shorthand resolved against the model's layer types: not checkable.
    if (target_modules_regex && *target_modules_regex == "all-linear") return true;
    if (target_modules_regex)
      return std::regex_match(module, compile(*target_modules_regex, "target_modules", "config"));
    if (target_modules.empty()) return true;
    for (const auto& t : target_modules) {
      if (module == t) return true;
      if (module.size() > t.size() && module.compare(module.size() - t.size(), t.size(), t) == 0 &&
          module[module.size() - t.size() - 1] == '.')
        return true;
    }
    return false;
  }

  /// Throws FormatError unless every rank_pattern / alpha_pattern key matches at least one of
  /// `modules` (a key that matches nothing is a typo PEFT would silently ignore) and every module
  /// is selected by target_modules.
  void check_modules(const std::vector<std::string>& modules,
                     const std::string& source = "adapter_config.json") const {
    auto check = [&](const auto& patterns, const char* what) {
      for (const auto& [key, value] : patterns) {
        bool used = false;
        for (const auto& m : modules)
          used = used || std::regex_match(m, compile("(.*\\.)?(" + key + ")", key, what));
        if (!used)
          throw FormatError("adapter config \"" + source + "\": " + what + " key \"" + key +
                            "\" matches none of the adapter's " + std::to_string(modules.size()) +
                            " modules (PEFT's rule: the module path must match (.*\\.)?(" + key +
                            ")$)");
      }
    };
    check(rank_pattern, "rank_pattern");
    check(alpha_pattern, "alpha_pattern");
    for (const auto& m : modules)
      if (!targets(m))
        throw FormatError("adapter config \"" + source + "\": module \"" + m +
                          "\" has LoRA weights but is not selected by target_modules");
  }

  // ---- writing ---------------------------------------------------------------------------------

  /// The config as PEFT 0.21 writes it: every LoraConfig field (the original file's fields are
  /// kept; a config built in code gets PEFT's defaults), keys sorted, as save_pretrained does.
  nlohmann::json to_json() const {
    nlohmann::json j = default_fields();
    if (original.is_object())
      for (const auto& [k, v] : original.items()) j[k] = v;
    j["peft_type"] = peft_type;
    j["r"] = r;
    j["lora_alpha"] = number(lora_alpha);
    j["use_rslora"] = use_rslora;
    if (target_modules_regex)
      j["target_modules"] = *target_modules_regex;
    else if (!target_modules.empty())
      j["target_modules"] = target_modules;
    else
      j["target_modules"] = nullptr;
    nlohmann::json rp = nlohmann::json::object(), ap = nlohmann::json::object();
    for (const auto& [k, v] : rank_pattern) rp[k] = v;
    for (const auto& [k, v] : alpha_pattern) ap[k] = number(v);
    j["rank_pattern"] = rp;
    j["alpha_pattern"] = ap;
    j["fan_in_fan_out"] = fan_in_fan_out;
    j["bias"] = bias;
    j["lora_bias"] = lora_bias;
    j["use_dora"] = use_dora;
    if (modules_to_save.empty())
      j["modules_to_save"] = nullptr;
    else
      j["modules_to_save"] = modules_to_save;
    j["inference_mode"] = true;
    return j;
  }

  /// to_json() as text, indented by 2 like PEFT's save_pretrained (json.dumps(indent=2,
  /// sort_keys=True)).
  std::string dump() const { return to_json().dump(2); }

 private:
  static std::regex compile(const std::string& pattern, const std::string& what,
                            const std::string& source) {
    try {
      return std::regex(pattern, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      throw FormatError("adapter config \"" + source + "\": " + what + " \"" + pattern +
                        "\" is not a valid regular expression: " + e.what());
    }
  }

  template <typename V>
  static V lookup(const std::vector<std::pair<std::string, V>>& p, const std::string& key) {
    for (const auto& [k, v] : p)
      if (k == key) return v;
    return V{};
  }

  /// An integral alpha is written as an integer (8, not 8.0), as Python writes the int it was
  /// given.
  static nlohmann::json number(double v) {
    if (std::floor(v) == v && std::fabs(v) < 9.0e15) return static_cast<long long>(v);
    return v;
  }

  /// Every field PEFT 0.21.0 writes in a LoRA adapter_config.json, with its default.
  static nlohmann::json default_fields() {
    return nlohmann::json{{"alora_invocation_tokens", nullptr},
                          {"alpha_pattern", nlohmann::json::object()},
                          {"arrow_config", nullptr},
                          {"auto_mapping", nullptr},
                          {"base_model_name_or_path", nullptr},
                          {"bias", "none"},
                          {"corda_config", nullptr},
                          {"ensure_weight_tying", false},
                          {"eva_config", nullptr},
                          {"exclude_modules", nullptr},
                          {"fan_in_fan_out", false},
                          {"inference_mode", true},
                          {"init_lora_weights", true},
                          {"kasa_config", nullptr},
                          {"layer_replication", nullptr},
                          {"layers_pattern", nullptr},
                          {"layers_to_transform", nullptr},
                          {"loftq_config", nlohmann::json::object()},
                          {"lora_alpha", 8},
                          {"lora_bias", false},
                          {"lora_dropout", 0.0},
                          {"lora_ga_config", nullptr},
                          {"megatron_config", nullptr},
                          {"megatron_core", "megatron.core"},
                          {"modules_to_save", nullptr},
                          {"monteclora_config", nullptr},
                          {"peft_type", "LORA"},
                          {"peft_version", "0.21.0"},
                          {"qalora_group_size", 16},
                          {"r", 8},
                          {"rank_pattern", nlohmann::json::object()},
                          {"revision", nullptr},
                          {"target_modules", nullptr},
                          {"target_parameters", nullptr},
                          {"task_type", nullptr},
                          {"trainable_token_indices", nullptr},
                          {"use_bdlora", nullptr},
                          {"use_dora", false},
                          {"use_qalora", false},
                          {"use_rslora", false},
                          {"velora_config", nullptr}};
  }
};

}  // namespace lora::peft
