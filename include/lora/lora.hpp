// lora: Low-Rank Adaptation (arXiv 2106.09685) for frozen Eigen models. The umbrella header.
#pragma once

#include "lora/adapter.hpp"
#include "lora/adapter_layer.hpp"
#include "lora/bf16_frozen_weight.hpp"
#include "lora/config.hpp"
#include "lora/dense_frozen_weight.hpp"
#include "lora/frozen_storage.hpp"
#include "lora/lora_linear.hpp"
#include "lora/nf4_frozen_weight.hpp"
#include "lora/optim.hpp"
#include "lora/parameter.hpp"
#include "lora/random.hpp"
#include "lora/version.hpp"
#include "lora/workspace.hpp"
// Many adapters on one base, adapter files (safetensors writing, PEFT adapter directories).
#include "lora/io/safetensors_writer.hpp"
#include "lora/multi_lora_linear.hpp"
#include "lora/peft/adapter_config.hpp"
#include "lora/peft/adapter_io.hpp"
#include "lora/weighted_adapter.hpp"
