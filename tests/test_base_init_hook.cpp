// A program that never includes lora/base_init.hpp (this binary: the core alone) does not compile
// PiSSA, OLoRA or LoftQ; an adapter that asks for one is refused with a message that says which
// header to include, and the layer is left as it was. (lora_tests includes the header: its
// test_inits.cpp checks the inits themselves.)
#include <gtest/gtest.h>
#include <lora/core.hpp>

#include <Eigen/Core>

#include <stdexcept>
#include <string>

namespace {

TEST(BaseInitHook, AResidualInitWithoutItsHeaderIsRefusedAndSaysWhichHeader) {
  const Eigen::MatrixXf W0 = Eigen::MatrixXf::Random(6, 5);
  for (const lora::Init init : {lora::Init::PiSSA, lora::Init::OLoRA, lora::Init::LoftQ}) {
    lora::LoRAConfig cfg;
    cfg.rank = 2;
    cfg.init = init;
    try {
      lora::LoRALinear<float> layer(W0, cfg);
      FAIL() << "a residual init was accepted without lora/base_init.hpp";
    } catch (const std::logic_error& e) {
      EXPECT_NE(std::string(e.what()).find("<lora/base_init.hpp>"), std::string::npos) << e.what();
    }
  }
}

TEST(BaseInitHook, InitsThatNeedNoBaseWeightWorkWithoutIt) {
  const Eigen::MatrixXf W0 = Eigen::MatrixXf::Random(6, 5);
  lora::LoRAConfig cfg;
  cfg.rank = 2;
  cfg.init = lora::Init::Orthogonal;
  lora::LoRALinear<float> layer(W0, cfg);
  const Eigen::MatrixXf X = Eigen::MatrixXf::Random(5, 3);
  // Orthogonal starts with B A = 0 while A and B are not zero: the layer equals its base.
  EXPECT_GT(layer.A().norm(), 0.0f);
  EXPECT_GT(layer.B().norm(), 0.0f);
  EXPECT_LT((layer.forward(X) - W0 * X).cwiseAbs().maxCoeff(), 1e-6f);
}

}  // namespace
