// lora/gguf.hpp: llama.cpp's files. Reads and writes GGUF containers (lora/io/gguf.hpp,
// lora/io/gguf_writer.hpp): base weights for the frozen storages, LoRA adapters in llama.cpp's
// format, and PEFT <-> GGUF conversion for the llama family. Link lora::gguf.
#pragma once

#include "lora/core.hpp"
#include "lora/gguf/adapter_io.hpp"
#include "lora/gguf/base_weights.hpp"
#include "lora/gguf/peft_convert.hpp"
#include "lora/io/gguf.hpp"
#include "lora/io/gguf_value.hpp"
#include "lora/io/gguf_writer.hpp"
