// lora/core.hpp: the layers, adapters, frozen storages, optimizers and workspace, on Eigen alone
// (no JSON library, no <regex>, no POSIX headers). Link lora::lora.
//
// Opt-in headers, each with the CMake target that brings its dependency:
//   lora/bf16_frozen_weight.hpp   bf16 frozen base (lora::lora; lora::onednn for the oneDNN kernel)
//   lora/nf4_frozen_weight.hpp    4-bit NormalFloat frozen base (likewise)
//   lora/base_init.hpp            PiSSA, OLoRA and LoftQ (Eigen's SVD): include it in one file of
//                                 a program whose adapters use them
//   lora/peft.hpp                 safetensors and PEFT adapter files (lora::peft: nlohmann-json)
//   lora/mpi.hpp                  data-parallel training (lora::mpi: MPI)
//   lora/lora.hpp                 everything but MPI and oneDNN (lora::peft)
// The bf16 and NF4 storages are left out here because their non-template products instantiate
// Eigen's matrix kernels in every file that includes it (about 2.5 times the parse cost of
// Eigen/Core).
#pragma once

#include "lora/adapter.hpp"
#include "lora/adapter_init.hpp"
#include "lora/adapter_layer.hpp"
#include "lora/config.hpp"
#include "lora/dense_frozen_weight.hpp"
#include "lora/frozen_storage.hpp"
#include "lora/lora_embedding.hpp"
#include "lora/lora_experts.hpp"
#include "lora/lora_linear.hpp"
#include "lora/multi_lora_linear.hpp"
#include "lora/optim.hpp"
#include "lora/parameter.hpp"
#include "lora/plain_adapter.hpp"
#include "lora/random.hpp"
#include "lora/schedule.hpp"
#include "lora/summary.hpp"
#include "lora/version.hpp"
#include "lora/weighted_active_set.hpp"
#include "lora/weighted_adapter.hpp"
#include "lora/workspace.hpp"
