// Checks the JSON that `attention_lora --quick` writes (ctest runs it first, as the fixture
// example_attention_lora): the structure of both tables, parameter counts recomputed here from
// r (d + k) per adapted matrix, and that LoRA learns the downstream task: on the reversed-priority
// task every LoRA configuration must beat the frozen base.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <string>
#include <vector>

namespace {

using nlohmann::json;

const json& tables() {
  static const json j = [] {
    std::ifstream in(LORA_ATTENTION_JSON);
    if (!in) throw std::runtime_error("cannot open " + std::string(LORA_ATTENTION_JSON));
    return json::parse(in);
  }();
  return j;
}

using Matrices = std::vector<std::string>;

// r (d + k) per adapted d x k projection, in every layer.
long long lora_parameters(const json& settings, const Matrices& m, int rank) {
  const long long d = settings.at("d_model").get<long long>();
  return rank * (d + d) * static_cast<long long>(m.size()) * settings.at("layers").get<int>();
}

void check_row(const json& row, const json& settings, const Matrices& matrices, int rank) {
  SCOPED_TRACE(row.dump());
  EXPECT_EQ(row.at("matrices").get<Matrices>(), matrices);
  EXPECT_EQ(row.at("rank").get<int>(), rank);
  EXPECT_EQ(row.at("trainable_parameters").get<long long>(),
            lora_parameters(settings, matrices, rank));
  const double acc = row.at("accuracy").get<double>();
  EXPECT_GE(acc, 0.0);
  EXPECT_LE(acc, 1.0);
  EXPECT_GE(row.at("accuracy_std").get<double>(), 0.0);
  EXPECT_EQ(row.at("accuracy_per_seed").size(), settings.at("seeds").get<std::size_t>());
}

const json& task(const std::string& name) {
  for (const json& t : tables().at("downstream"))
    if (t.at("name") == name) return t;
  throw std::runtime_error("no downstream task " + name);
}

TEST(AttentionTables, SettingsAndUpstream) {
  const json& j = tables();
  EXPECT_EQ(j.at("settings").at("mode"), "quick");
  EXPECT_GE(j.at("settings").at("d_model").get<int>(), 64);  // rank 64 fits without capping
  EXPECT_DOUBLE_EQ(j.at("chance").get<double>(), 1.0 / j.at("settings").at("classes").get<int>());
  // The base must have learned the upstream task, or the downstream numbers mean nothing.
  EXPECT_GT(j.at("upstream_accuracy").get<double>(), 0.9);
  ASSERT_EQ(j.at("downstream").size(), 2u);
}

TEST(AttentionTables, BothTablesHaveEveryConfiguration) {
  const json& settings = tables().at("settings");
  const Matrices q{"Wq"}, k{"Wk"}, v{"Wv"}, o{"Wo"}, qv{"Wq", "Wv"}, all{"Wq", "Wk", "Wv", "Wo"};
  for (const json& t : tables().at("downstream")) {
    SCOPED_TRACE(t.at("name").get<std::string>());
    const json& budget = t.at("table_budget");
    ASSERT_EQ(budget.size(), 6u);
    const std::vector<std::pair<Matrices, int>> expected_budget{{q, 8}, {k, 8},  {v, 8},
                                                                {o, 8}, {qv, 4}, {all, 2}};
    for (std::size_t i = 0; i < budget.size(); ++i)
      check_row(budget[i], settings, expected_budget[i].first, expected_budget[i].second);
    // The budget is the same for every row: the point of table 1.
    for (const json& row : budget)
      EXPECT_EQ(row.at("trainable_parameters"), budget[0].at("trainable_parameters"));

    const json& ranks = t.at("table_rank");
    ASSERT_EQ(ranks.size(), 12u);
    const int r[] = {1, 2, 4, 8, 16, 64};
    for (int i = 0; i < 6; ++i) {
      check_row(ranks[i], settings, qv, r[i]);
      check_row(ranks[6 + i], settings, all, r[i]);
    }
    EXPECT_EQ(t.at("frozen_base").at("trainable_parameters").get<long long>(), 0);
    // Full fine-tuning trains everything: embeddings (vocab + positions), 4 d x d projections per
    // layer and the head (C x d + C).
    const long long d = settings.at("d_model"), C = settings.at("classes");
    const long long everything =
        (settings.at("vocab").get<long long>() + settings.at("seq_len").get<long long>()) * d +
        4 * d * d * settings.at("layers").get<long long>() + C * d + C;
    EXPECT_EQ(t.at("full_fine_tuning").at("trainable_parameters").get<long long>(), everything);
    // Full fine-tuning learns either downstream task.
    EXPECT_GT(t.at("full_fine_tuning").at("accuracy").get<double>(),
              t.at("frozen_base").at("accuracy").get<double>() + 0.5);
  }
}

// The frozen base reads the alpha token, so it is near chance on "beta first"; every LoRA
// configuration, at every rank and on every matrix set, must do clearly better.
TEST(AttentionTables, EveryLoRAConfigurationBeatsTheFrozenBase) {
  const json& t = task("beta_first");
  const double frozen = t.at("frozen_base").at("accuracy").get<double>();
  EXPECT_LT(frozen, 2 * tables().at("chance").get<double>());
  for (const char* table : {"table_budget", "table_rank"})
    for (const json& row : t.at(table)) {
      SCOPED_TRACE(row.dump());
      EXPECT_GT(row.at("accuracy").get<double>(), frozen + 0.1);
    }
}

// On the relabelled task only an adapter that can change the values read can help; the best
// configuration must still beat the base clearly.
TEST(AttentionTables, RelabelledTaskIsLearnedByTheBestConfiguration) {
  const json& t = task("beta_first_shifted");
  const double frozen = t.at("frozen_base").at("accuracy").get<double>();
  double best = 0;
  for (const char* table : {"table_budget", "table_rank"})
    for (const json& row : t.at(table)) best = std::max(best, row.at("accuracy").get<double>());
  EXPECT_GT(best, frozen + 0.3);
}

}  // namespace
