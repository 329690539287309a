// lora/peft.hpp: adapter files. Reads and writes safetensors tensors and Hugging Face PEFT adapter
// directories (adapter_config.json + adapter_model.safetensors) for LoRALinear and
// MultiLoRALinear layers, for LoRAEmbedding and LoRAExperts (target_modules / target_parameters),
// and optimizer state beside them. Link lora::peft (nlohmann-json).
#pragma once

#include "lora/core.hpp"
#include "lora/io/safetensors.hpp"
#include "lora/io/safetensors_writer.hpp"
#include "lora/optimizer_state.hpp"
#include "lora/peft/adapter_config.hpp"
#include "lora/peft/adapter_io.hpp"
#include "lora/peft/adapter_store.hpp"
#include "lora/peft/embedding_experts_io.hpp"
#include "lora/peft/hotswap.hpp"
#include "lora/peft/make_layers.hpp"
