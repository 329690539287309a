// lora::peft::AdapterConfig: the fields of a PEFT `adapter_config.json` (LoraConfig) that decide
// how an adapter is applied, and PEFT's rules for them: per-module rank and alpha from
// `rank_pattern` / `alpha_pattern`, and which modules `target_modules` selects.
#pragma once

#include "lora/config.hpp"
#include "lora/detail/compiled_mode.hpp"
#include "lora/io/read_file.hpp"
#include "lora/io/safetensors.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <regex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace lora::peft {

using io::FormatError;

/// Limits on what an adapter_config.json may hold. Real configs are a few kilobytes, nest 3
/// levels deep and hold patterns of a few dozen characters; these bounds keep hostile ones from
/// exhausting memory or the stack (json::dump() and deep copies recurse once per nesting level,
/// std::regex once per group and per character).
inline constexpr std::uint64_t kMaxConfigBytes = 64u << 20;
inline constexpr int kMaxConfigDepth = 64;
/// The longest regular expression (a pattern key, or target_modules as a string).
inline constexpr std::size_t kMaxPatternLength = 1024;
/// The deepest nesting of groups `(...)` in a regular expression.
inline constexpr int kMaxPatternNesting = 32;
/// The longest pattern key that needs no regular expression (a module path, escaped or not; see
/// SimpleKey): such keys are never compiled, and an escaped 1,024-character path needs 2,048.
inline constexpr std::size_t kMaxLiteralKeyLength = 4096;

namespace detail {

/// A JSON value from a file, for an error message: its text when short and flat, otherwise only
/// its type and size (a hostile value may be megabytes long, or nest deeply).
LORA_FUNC std::string brief_json(const nlohmann::ordered_json& v);

/// The deepest nesting in v (a scalar: 0, [] or {}: 1), found without recursion.
LORA_FUNC int json_depth(const nlohmann::ordered_json& v, int stop_above);

/// Throws FormatError unless `pattern` (a regular expression from the file) is short and shallow
/// enough to compile and match within the stack: at most kMaxPatternLength characters and
/// kMaxPatternNesting nested groups. (libstdc++'s std::regex recurses once per nested group when
/// compiling; 20,000 of them overflow the stack under ASan.)
LORA_FUNC void check_pattern_bounds(const std::string& pattern, const std::string& what,
                                    const std::string& source);

/// Compiles a bounded regular expression from the file (check_pattern_bounds first).
LORA_FUNC std::regex compile_pattern(const std::string& regex, const std::string& shown,
                                     const std::string& what, const std::string& source);

/// A pattern key that needs no regular expression: literal characters, escaped punctuation
/// (`\.`, what save_adapter writes), and `.` wildcards (a key written as a plain module path,
/// "model.layers.0.q_proj", uses them), optionally anchored by a leading `^` and closed by `$`.
struct SimpleKey {
  std::string text;       ///< the characters to match; a wildcard position holds '\0'
  std::string wildcards;  ///< '1' where the key has an unescaped `.`, else '0'
  bool anchored = false;  ///< a leading `^`: only the whole module path can match
};

LORA_FUNC std::optional<SimpleKey> simple_key(const std::string& key);

/// PEFT's pattern keys (rank_pattern or alpha_pattern), each compiled once, for matching many
/// module paths. PEFT's rule: key k matches a module when `(.*\.)?(k)` matches the whole path;
/// the first key in order that matches wins. Simple keys (above) are matched without a regular
/// expression: the path's suffixes that start after a '.' are looked up in a hash table, so a
/// path costs O(its length x the distinct key shapes), not O(number of keys).
class PatternTable {
 public:
  PatternTable() = default;
  PatternTable(std::vector<std::string> keys, const std::string& what, const std::string& source);

  /// The index of the first key that matches `module`, or nothing.
  std::optional<std::size_t> first_match(const std::string& module) const;

  /// Sets used[i] for every key i that matches `module` (regex keys already used are skipped).
  void mark_matches(const std::string& module, std::vector<bool>& used) const;

  const std::vector<std::string>& keys() const { return keys_; }

 private:
  struct Group {
    std::size_t length = 0;
    bool anchored = false;
    std::vector<std::size_t> wildcards;                              // positions of `.` in the key
    std::unordered_map<std::string, std::vector<std::size_t>> keys;  // text -> key indices
  };

  /// Calls f(i) for each simple key i matching `module`. `(.*\.)?` matches the empty prefix or
  /// one ending in '.' whose other characters are not line terminators (ECMAScript's `.`
  /// excludes '\n' and '\r'); the rest of the path must then equal the key, where a wildcard
  /// matches any character but a line terminator.
  template <typename F>
  void for_each_simple_match(const std::string& module, F f) const;

  std::vector<std::string> keys_;
  std::vector<Group> groups_;
  std::vector<std::pair<std::size_t, std::regex>> regexes_;  // in key order
};

template <typename V>
std::vector<std::string> keys_of(const std::vector<std::pair<std::string, V>>& patterns) {
  std::vector<std::string> keys;
  keys.reserve(patterns.size());
  for (const auto& [k, v] : patterns) keys.push_back(k);
  return keys;
}

#if LORA_WITH_BODIES

LORA_FUNC std::string brief_json(const nlohmann::ordered_json& v) {
  const bool flat = std::none_of(v.begin(), v.end(),
                                 [](const nlohmann::ordered_json& e) { return e.is_structured(); });
  if (!v.is_structured() || (flat && v.size() <= 4)) {
    if (v.is_string()) return io::quote_for_message(v.get_ref<const std::string&>(), 80);
    std::string text = v.dump();
    if (text.size() > 80) text = text.substr(0, 77) + "...";
    return text;
  }
  return std::string("an ") + v.type_name() + " of " + std::to_string(v.size()) + " elements";
}

LORA_FUNC int json_depth(const nlohmann::ordered_json& v, int stop_above) {
  int deepest = 0;
  std::vector<std::pair<const nlohmann::ordered_json*, int>> todo{{&v, 0}};
  while (!todo.empty()) {
    const auto [node, depth] = todo.back();
    todo.pop_back();
    if (!node->is_structured()) continue;
    deepest = std::max(deepest, depth + 1);
    if (deepest > stop_above) return deepest;
    for (const auto& child : *node) todo.emplace_back(&child, depth + 1);
  }
  return deepest;
}

LORA_FUNC void check_pattern_bounds(const std::string& pattern, const std::string& what,
                                    const std::string& source) {
  auto fail = [&](const std::string& why) {
    return FormatError("adapter config \"" + source + "\": " + what + " " +
                       io::quote_for_message(pattern) + ": " + why);
  };
  if (pattern.size() > kMaxPatternLength)
    throw fail("regular expressions are limited to " + std::to_string(kMaxPatternLength) +
               " characters");
  int depth = 0;
  bool in_class = false;
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\') {
      ++i;  // the escaped character is literal
    } else if (in_class) {
      in_class = c != ']';
    } else if (c == '[') {
      in_class = true;
    } else if (c == '(') {
      if (++depth > kMaxPatternNesting)
        throw fail("regular expressions may nest at most " + std::to_string(kMaxPatternNesting) +
                   " groups");
    } else if (c == ')') {
      --depth;
    }
  }
}

LORA_FUNC std::regex compile_pattern(const std::string& regex, const std::string& shown,
                                     const std::string& what, const std::string& source) {
  check_pattern_bounds(shown, what, source);
  try {
    return std::regex(regex, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    throw FormatError("adapter config \"" + source + "\": " + what + " " +
                      io::quote_for_message(shown) +
                      " is not a valid regular expression: " + e.what());
  }
}

LORA_FUNC std::optional<SimpleKey> simple_key(const std::string& key) {
  static const std::string punctuation = "^$\\.*+?()[]{}|/-";
  static const std::string special = "^$\\.*+?()[]{}|";
  SimpleKey k;
  std::size_t i = 0, end = key.size();
  if (end > 0 && key[0] == '^') {
    k.anchored = true;
    i = 1;
  }
  if (end > i && key[end - 1] == '$' && (end < 2 || key[end - 2] != '\\')) --end;
  for (; i < end; ++i) {
    const char c = key[i];
    if (c == '\\') {
      if (i + 1 >= end || punctuation.find(key[i + 1]) == std::string::npos) return std::nullopt;
      k.text += key[++i];
      k.wildcards += '0';
    } else if (c == '.') {
      k.text += '\0';
      k.wildcards += '1';
    } else if (special.find(c) != std::string::npos) {
      return std::nullopt;
    } else {
      k.text += c;
      k.wildcards += '0';
    }
  }
  if (k.text.empty()) return std::nullopt;
  return k;
}

LORA_FUNC PatternTable::PatternTable(std::vector<std::string> keys, const std::string& what,
                                     const std::string& source)
    : keys_(std::move(keys)) {
  std::map<std::tuple<std::size_t, bool, std::string>, std::size_t> group_of;
  for (std::size_t i = 0; i < keys_.size(); ++i) {
    if (const auto k = simple_key(keys_[i])) {
      if (keys_[i].size() > kMaxLiteralKeyLength)
        throw FormatError("adapter config \"" + source + "\": " + what + " key " +
                          io::quote_for_message(keys_[i]) + ": literal keys are limited to " +
                          std::to_string(kMaxLiteralKeyLength) + " characters");
      const auto id = std::make_tuple(k->text.size(), k->anchored, k->wildcards);
      auto it = group_of.find(id);
      if (it == group_of.end()) {
        it = group_of.emplace(id, groups_.size()).first;
        Group g;
        g.length = k->text.size();
        g.anchored = k->anchored;
        for (std::size_t p = 0; p < k->wildcards.size(); ++p)
          if (k->wildcards[p] == '1') g.wildcards.push_back(p);
        groups_.push_back(std::move(g));
      }
      groups_[it->second].keys[k->text].push_back(i);
    } else {
      regexes_.emplace_back(
          i, compile_pattern("(.*\\.)?(" + keys_[i] + ")", keys_[i], what + " key", source));
    }
  }
}

LORA_FUNC std::optional<std::size_t> PatternTable::first_match(const std::string& module) const {
  std::size_t best = keys_.size();
  for_each_simple_match(module, [&best](std::size_t i) { best = std::min(best, i); });
  for (const auto& [i, re] : regexes_) {
    if (i >= best) break;
    if (std::regex_match(module, re)) return i;
  }
  if (best == keys_.size()) return std::nullopt;
  return best;
}

LORA_FUNC void PatternTable::mark_matches(const std::string& module,
                                          std::vector<bool>& used) const {
  for_each_simple_match(module, [&used](std::size_t i) { used[i] = true; });
  for (const auto& [i, re] : regexes_)
    if (!used[i] && std::regex_match(module, re)) used[i] = true;
}

template <typename F>
void PatternTable::for_each_simple_match(const std::string& module, F f) const {
  if (groups_.empty()) return;
  std::string projected;
  for (std::size_t start = 0; start <= module.size(); ++start) {
    if (start > 0) {
      const char before = module[start - 1];
      if (before == '\n' || before == '\r') {
        break;  // this and every longer prefix holds a terminator: `.*\.` cannot match it
      }
      if (before != '.') continue;
    }
    const std::size_t length = module.size() - start;
    for (const Group& g : groups_) {
      if (g.length != length || (g.anchored && start != 0)) continue;
      projected.assign(module, start, length);
      bool ok = true;
      for (const std::size_t p : g.wildcards) {
        if (projected[p] == '\n' || projected[p] == '\r') ok = false;
        projected[p] = '\0';
      }
      if (!ok) continue;
      const auto it = g.keys.find(projected);
      if (it != g.keys.end())
        for (const std::size_t i : it->second) f(i);
    }
  }
}

#endif  // LORA_WITH_BODIES

}  // namespace detail

class ModuleRules;

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
  /// init_lora_weights: "true" / "false" (written as JSON booleans), or PEFT's init names
  /// ("gaussian", "pissa", "pissa_niter_N", "olora", "loftq", "orthogonal", ...; see
  /// lora/init.hpp). "pissa", "olora" and "loftq" say that the adapter belongs on a residual base
  /// (PEFT recomputes it from the original weights when it loads such a file); lora loads the
  /// weights onto whatever base the layers hold.
  std::string init_lora_weights = "true";
  /// The file as read (empty for a config built in code): its other fields are written back
  /// unchanged by to_json.
  nlohmann::ordered_json original;

  // ---- reading ---------------------------------------------------------------------------------

  /// Parses a LoraConfig JSON object. Throws FormatError for a field of the wrong type or value,
  /// a value nested deeper than kMaxConfigDepth, or a pattern beyond the limits above.
  static AdapterConfig from_json(const nlohmann::ordered_json& j,
                                 const std::string& source = "adapter_config.json");

  /// Parses the text of an adapter_config.json, with the limits load() applies (at most
  /// kMaxConfigBytes, no NUL byte, nesting at most kMaxConfigDepth: refused while parsing, as
  /// the parser itself is iterative). Throws FormatError.
  static AdapterConfig parse(const std::string& text,
                             const std::string& source = "adapter_config.json");

  /// Reads `path` (an adapter_config.json) and parses it as parse() does. Throws FormatError when
  /// it cannot be read (missing, a directory, larger than kMaxConfigBytes) or parsed.
  static AdapterConfig load(const std::string& path);

  /// Throws FormatError naming the setting when the adapter needs something this library does not
  /// implement: another PEFT method, modules_to_save, trained base biases, or DoRA with lora_bias
  /// (which PEFT refuses too).
  void require_supported(const std::string& source = "adapter_config.json") const;

  // ---- PEFT's per-module rules -----------------------------------------------------------------
  // Each call below compiles the patterns it needs; to resolve many modules, build rules() once.

  /// PEFT's get_pattern_key: the first key k (in file order) with the regex (.*[.])?(k) matching
  /// the whole module path, or nothing. Keys are regular expressions, as in PEFT.
  template <typename V>
  static std::optional<std::string> pattern_key(const std::vector<std::pair<std::string, V>>& p,
                                                const std::string& module) {
    const detail::PatternTable table(detail::keys_of(p), "pattern", "config");
    const auto i = table.first_match(module);
    if (!i) return std::nullopt;
    return p[*i].first;
  }

  /// The rules of this config compiled once (see ModuleRules); they refer to this config, which
  /// must outlive them and not change meanwhile.
  ModuleRules rules(const std::string& source = "adapter_config.json") const;

  /// The rank PEFT gives `module`: rank_pattern's matching entry, else r.
  int rank_for(const std::string& module) const;
  /// The alpha PEFT gives `module`: alpha_pattern's matching entry, else lora_alpha.
  double alpha_for(const std::string& module) const;
  /// The LoRAConfig of `module`: its rank, alpha, use_rslora (scaling alpha/r or alpha/sqrt r) and
  /// use_dora.
  LoRAConfig lora_config_for(const std::string& module) const;
  /// True when target_modules selects `module` (always true when the file gave none).
  bool targets(const std::string& module) const;
  /// Throws FormatError unless every rank_pattern / alpha_pattern key matches at least one of
  /// `modules` (a key that matches nothing is a typo PEFT would silently ignore) and every module
  /// is selected by target_modules.
  void check_modules(const std::vector<std::string>& modules,
                     const std::string& source = "adapter_config.json") const;

  // ---- writing ---------------------------------------------------------------------------------

  /// The config as PEFT 0.21 writes it: every LoraConfig field (the original file's fields are
  /// kept; a config built in code gets PEFT's defaults), keys sorted, as save_pretrained does.
  nlohmann::json to_json() const;

  /// to_json() as text, indented by 2 like PEFT's save_pretrained (json.dumps(indent=2,
  /// sort_keys=True)).
  std::string dump() const;

 private:
  /// An integral alpha is written as an integer (8, not 8.0), as Python writes the int it was
  /// given.
  static nlohmann::json number(double v);

  /// Every field PEFT 0.21.0 writes in a LoRA adapter_config.json, with its default.
  static nlohmann::json default_fields();
};

/// An AdapterConfig's per-module rules with every pattern compiled once: resolving N modules
/// costs O(N) pattern look-ups, not O(N x keys) regex compilations. Holds a reference to the
/// config.
class ModuleRules {
 public:
  /// Compiles every pattern key of `config` once (`source` names the file in messages).
  explicit ModuleRules(const AdapterConfig& config,
                       const std::string& source = "adapter_config.json");

  /// The rank_pattern key that decides `module`'s rank, or nothing (then r).
  std::optional<std::string> rank_key(const std::string& module) const;
  /// The alpha_pattern key that decides `module`'s alpha, or nothing (then lora_alpha).
  std::optional<std::string> alpha_key(const std::string& module) const;

  /// The rank of `module`: its rank_pattern entry, or the config's r.
  int rank_for(const std::string& module) const;

  /// The lora_alpha of `module`: its alpha_pattern entry, or the config's lora_alpha.
  double alpha_for(const std::string& module) const;

  /// The LoRAConfig of `module` (rank, alpha, rsLoRA) as PEFT builds the layer.
  LoRAConfig lora_config_for(const std::string& module) const;

  /// True when target_modules selects `module`: as a list, the path equals an entry or ends with
  /// "." + entry; as a string, the regex matches the whole path ("all-linear", PEFT's shorthand
  /// resolved against the model's layer types, selects everything here). No target_modules: true.
  bool targets(const std::string& module) const;

  /// Throws FormatError for a module that `config` does not target.
  void check_modules(const std::vector<std::string>& modules) const;

 private:
  const AdapterConfig* config_;
  std::string source_;
  detail::PatternTable rank_, alpha_;
  std::unordered_set<std::string> targets_;
  std::regex target_regex_;
};

#if LORA_WITH_BODIES

LORA_FUNC AdapterConfig AdapterConfig::from_json(const nlohmann::ordered_json& j,
                                                 const std::string& source) {
  auto fail = [&source](const std::string& what) -> FormatError {
    return FormatError("adapter config \"" + source + "\": " + what);
  };
  if (!j.is_object()) throw fail("must be a JSON object, got " + std::string(j.type_name()));
  // The same limit as parse() and load(), for a value built in code: copying it (original = j)
  // and dumping it recurse once per level.
  if (detail::json_depth(j, kMaxConfigDepth) > kMaxConfigDepth)
    throw fail("nests deeper than " + std::to_string(kMaxConfigDepth) + " levels");
  AdapterConfig c;
  c.original = j;
  auto has = [&j](const char* key) { return j.contains(key) && !j.at(key).is_null(); };
  auto get_bool = [&](const char* key, bool& out) {
    if (!has(key)) return;
    if (!j.at(key).is_boolean())
      throw fail(std::string(key) + " must be true or false, got " + detail::brief_json(j.at(key)));
    out = j.at(key).get<bool>();
  };
  auto get_string = [&](const char* key, std::string& out) {
    if (!has(key)) return;
    if (!j.at(key).is_string())
      throw fail(std::string(key) + " must be a string, got " + detail::brief_json(j.at(key)));
    out = j.at(key).get<std::string>();
  };
  auto get_rank = [&](const nlohmann::ordered_json& v, const std::string& what) {
    if (!v.is_number_integer() || v.get<long long>() < 1 || v.get<long long>() > (1 << 30))
      throw fail(what + " must be a positive integer, got " + detail::brief_json(v));
    return static_cast<int>(v.get<long long>());
  };
  auto get_alpha = [&](const nlohmann::ordered_json& v, const std::string& what) {
    if (!v.is_number() || !std::isfinite(v.get<double>()))
      throw fail(what + " must be a finite number, got " + detail::brief_json(v));
    return v.get<double>();
  };
  auto get_string_list = [&](const char* key, std::vector<std::string>& out) {
    for (const auto& e : j.at(key)) {
      if (!e.is_string()) throw fail(std::string(key) + " entries must be strings");
      out.push_back(e.get<std::string>());
    }
  };

  // peft_type, r and lora_alpha decide what the weights mean: null is not a default here (PEFT
  // itself fails on a null r or lora_alpha, and would not know which method a null type is).
  if (!j.contains("peft_type")) throw fail("peft_type is missing");
  if (!j.at("peft_type").is_string())
    throw fail("peft_type must be a string such as \"LORA\", got " +
               detail::brief_json(j.at("peft_type")));
  get_string("peft_type", c.peft_type);
  if (j.contains("r")) c.r = get_rank(j.at("r"), "r");
  if (j.contains("lora_alpha")) c.lora_alpha = get_alpha(j.at("lora_alpha"), "lora_alpha");
  get_bool("use_rslora", c.use_rslora);
  get_bool("fan_in_fan_out", c.fan_in_fan_out);
  get_string("bias", c.bias);
  get_bool("lora_bias", c.lora_bias);
  get_bool("use_dora", c.use_dora);
  if (has("init_lora_weights")) {
    const auto& v = j.at("init_lora_weights");
    if (v.is_boolean())
      c.init_lora_weights = v.get<bool>() ? "true" : "false";
    else if (v.is_string() && v.get_ref<const std::string&>().size() <= 64)
      c.init_lora_weights = v.get<std::string>();
    else
      throw fail("init_lora_weights must be true, false or an init's name, got " +
                 detail::brief_json(v));
  }
  if (has("target_modules")) {
    const auto& t = j.at("target_modules");
    if (t.is_string()) {
      c.target_modules_regex = t.get<std::string>();
      if (*c.target_modules_regex != "all-linear")
        detail::compile_pattern(*c.target_modules_regex, *c.target_modules_regex, "target_modules",
                                source);
    } else if (t.is_array()) {
      get_string_list("target_modules", c.target_modules);
    } else {
      throw fail("target_modules must be a list of names or a regex string, got " +
                 detail::brief_json(t));
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
      const std::string what = std::string(key) + "[" + io::quote_for_message(k) + "]";
      if (key[0] == 'r')
        c.rank_pattern.emplace_back(k, get_rank(v, what));
      else
        c.alpha_pattern.emplace_back(k, get_alpha(v, what));
    }
  }
  // Every key is checked (bounds; a regular expression compiles) once, here.
  (void)detail::PatternTable(detail::keys_of(c.rank_pattern), "rank_pattern", source);
  (void)detail::PatternTable(detail::keys_of(c.alpha_pattern), "alpha_pattern", source);
  return c;
}

LORA_FUNC AdapterConfig AdapterConfig::parse(const std::string& text, const std::string& source) {
  auto fail = [&source](const std::string& what) {
    return FormatError("adapter config \"" + source + "\" " + what);
  };
  if (text.size() > kMaxConfigBytes)
    throw fail("is " + std::to_string(text.size()) + " bytes, more than the limit of " +
               std::to_string(kMaxConfigBytes));
  // JSON has no raw NUL byte, and nlohmann's parser would stop at one and ignore the rest.
  if (const auto nul = text.find('\0'); nul != std::string::npos)
    throw fail("has a NUL byte at offset " + std::to_string(nul));
  nlohmann::ordered_json j;
  try {
    j = nlohmann::ordered_json::parse(
        text, [&](int depth, nlohmann::ordered_json::parse_event_t event, nlohmann::ordered_json&) {
          using Event = nlohmann::ordered_json::parse_event_t;
          // An object or array opened below `depth` enclosing ones is at level depth + 1.
          if ((event == Event::object_start || event == Event::array_start) &&
              depth >= kMaxConfigDepth)
            throw fail("nests deeper than " + std::to_string(kMaxConfigDepth) + " levels");
          return true;
        });
  } catch (const nlohmann::json::exception& e) {
    throw fail(std::string("is not valid JSON: ") + e.what());
  }
  return from_json(j, source);
}

LORA_FUNC AdapterConfig AdapterConfig::load(const std::string& path) {
  const std::vector<std::uint8_t> bytes = io::read_file(path, "adapter config", kMaxConfigBytes);
  return parse(std::string(bytes.begin(), bytes.end()), path);
}

LORA_FUNC void AdapterConfig::require_supported(const std::string& source) const {
  auto refuse = [&source](const std::string& what) {
    throw FormatError("adapter config \"" + source + "\": " + what);
  };
  if (peft_type != "LORA")
    refuse("peft_type is " + io::quote_for_message(peft_type) +
           "; only LoRA adapters (\"LORA\") can be applied");
  if (use_dora && lora_bias)
    refuse("use_dora (DoRA) and lora_bias are both true; PEFT does not support that combination");
  if (!modules_to_save.empty())
    refuse("modules_to_save lists " + std::to_string(modules_to_save.size()) +
           " fully trained module(s) (first: " + io::quote_for_message(modules_to_save.front()) +
           "); only LoRA factors can be applied, not replaced modules");
  if (bias != "none")
    refuse("bias is " + io::quote_for_message(bias) +
           "; only \"none\" is supported (the file would carry trained base biases)");
}

LORA_FUNC nlohmann::json AdapterConfig::to_json() const {
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
  if (init_lora_weights == "true" || init_lora_weights == "false")
    j["init_lora_weights"] = init_lora_weights == "true";
  else
    j["init_lora_weights"] = init_lora_weights;
  if (modules_to_save.empty())
    j["modules_to_save"] = nullptr;
  else
    j["modules_to_save"] = modules_to_save;
  j["inference_mode"] = true;
  return j;
}

LORA_FUNC std::string AdapterConfig::dump() const {
  return to_json().dump(2);
}

LORA_FUNC nlohmann::json AdapterConfig::number(double v) {
  if (std::floor(v) == v && std::fabs(v) < 9.0e15) return static_cast<long long>(v);
  return v;
}

LORA_FUNC nlohmann::json AdapterConfig::default_fields() {
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

LORA_FUNC ModuleRules::ModuleRules(const AdapterConfig& config, const std::string& source)
    : config_(&config),
      source_(source),
      rank_(detail::keys_of(config.rank_pattern), "rank_pattern", source),
      alpha_(detail::keys_of(config.alpha_pattern), "alpha_pattern", source),
      targets_(config.target_modules.begin(), config.target_modules.end()) {
  if (config.target_modules_regex && *config.target_modules_regex != "all-linear")
    target_regex_ = detail::compile_pattern(*config.target_modules_regex,
                                            *config.target_modules_regex, "target_modules", source);
}

LORA_FUNC std::optional<std::string> ModuleRules::rank_key(const std::string& module) const {
  const auto i = rank_.first_match(module);
  if (!i) return std::nullopt;
  return config_->rank_pattern[*i].first;
}

LORA_FUNC std::optional<std::string> ModuleRules::alpha_key(const std::string& module) const {
  const auto i = alpha_.first_match(module);
  if (!i) return std::nullopt;
  return config_->alpha_pattern[*i].first;
}

LORA_FUNC int ModuleRules::rank_for(const std::string& module) const {
  const auto i = rank_.first_match(module);
  return i ? config_->rank_pattern[*i].second : config_->r;
}

LORA_FUNC double ModuleRules::alpha_for(const std::string& module) const {
  const auto i = alpha_.first_match(module);
  return i ? config_->alpha_pattern[*i].second : config_->lora_alpha;
}

LORA_FUNC LoRAConfig ModuleRules::lora_config_for(const std::string& module) const {
  LoRAConfig c;
  c.rank = rank_for(module);
  c.alpha = alpha_for(module);
  c.use_rslora = config_->use_rslora;
  c.use_dora = config_->use_dora;
  return c;
}

LORA_FUNC bool ModuleRules::targets(const std::string& module) const {
  const auto& regex = config_->target_modules_regex;
  if (regex && *regex == "all-linear") return true;
  if (regex) return std::regex_match(module, target_regex_);
  if (targets_.empty()) return true;
  if (targets_.count(module)) return true;
  for (std::size_t dot = module.find('.'); dot != std::string::npos;
       dot = module.find('.', dot + 1))
    if (targets_.count(module.substr(dot + 1))) return true;
  return false;
}

LORA_FUNC void ModuleRules::check_modules(const std::vector<std::string>& modules) const {
  auto check = [&](const detail::PatternTable& table, const char* what) {
    std::vector<bool> used(table.keys().size(), false);
    for (const auto& m : modules) table.mark_matches(m, used);
    for (std::size_t i = 0; i < used.size(); ++i)
      if (!used[i])
        throw FormatError("adapter config \"" + source_ + "\": " + what + " key " +
                          io::quote_for_message(table.keys()[i]) + " matches none of the " +
                          "adapter's " + std::to_string(modules.size()) +
                          " modules (PEFT's rule: the module path must match (.*\\.)?(key)$)");
  };
  check(rank_, "rank_pattern");
  check(alpha_, "alpha_pattern");
  for (const auto& m : modules)
    if (!targets(m))
      throw FormatError("adapter config \"" + source_ + "\": module " + io::quote_for_message(m) +
                        " has LoRA weights but is not selected by target_modules");
}

LORA_FUNC ModuleRules AdapterConfig::rules(const std::string& source) const {
  return ModuleRules(*this, source);
}

LORA_FUNC int AdapterConfig::rank_for(const std::string& module) const {
  return rules().rank_for(module);
}

LORA_FUNC double AdapterConfig::alpha_for(const std::string& module) const {
  return rules().alpha_for(module);
}

LORA_FUNC LoRAConfig AdapterConfig::lora_config_for(const std::string& module) const {
  return rules().lora_config_for(module);
}

LORA_FUNC bool AdapterConfig::targets(const std::string& module) const {
  return rules().targets(module);
}

LORA_FUNC void AdapterConfig::check_modules(const std::vector<std::string>& modules,
                                            const std::string& source) const {
  rules(source).check_modules(modules);
}

#endif  // LORA_WITH_BODIES

}  // namespace lora::peft
