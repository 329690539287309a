// lora: Low-Rank Adaptation (arXiv 2106.09685) for frozen Eigen models. The umbrella header:
// everything but MPI (lora/mpi.hpp), the oneDNN storage (lora/onednn/onednn_frozen_weight.hpp) and
// the PiSSA, OLoRA and LoftQ inits (lora/base_init.hpp: include it in one file of the program).
// Link lora::peft. A file that needs only the layers and optimizers includes lora/core.hpp
// (lora::lora, Eigen alone), which parses several times faster.
#pragma once

#include "lora/bf16_frozen_weight.hpp"
#include "lora/core.hpp"
#include "lora/ggml_frozen_weight.hpp"
#include "lora/nf4_frozen_weight.hpp"
#include "lora/peft.hpp"

// Compiled mode: with LORA_EXTERN_TEMPLATES (lora::compiled) the shipped instantiations are
// declared extern here and compiled once in that library.
#if defined(LORA_EXTERN_TEMPLATES)
#include "lora/extern_templates.hpp"
#endif
