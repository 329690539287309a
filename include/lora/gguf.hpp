// lora/gguf.hpp: llama.cpp's files. Reads and writes GGUF containers (lora/io/gguf.hpp,
// lora/io/gguf_writer.hpp): base weights for the frozen storages (quantized ones kept as stored),
// LoRA adapters in llama.cpp's format, PEFT <-> GGUF conversion for the llama family, and merged
// models written back as one GGUF file in a type of the user's choice. Link lora::gguf.
#pragma once

#include "lora/core.hpp"
#include "lora/gguf/adapter_io.hpp"
#include "lora/gguf/base_weights.hpp"
#include "lora/gguf/merged_model.hpp"
#include "lora/gguf/peft_convert.hpp"
#include "lora/io/gguf.hpp"
#include "lora/io/gguf_value.hpp"
#include "lora/io/gguf_writer.hpp"
