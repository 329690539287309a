// lora::compiled: the one translation unit that instantiates what lora/extern_templates.hpp
// declares `extern`, so that files built with LORA_EXTERN_TEMPLATES need not (see that header).
#define LORA_COMPILED_INSTANTIATE 1
#include "lora/extern_templates.hpp"
// PiSSA, OLoRA and LoftQ, compiled here once and registered for the shipped storages.
#include "lora/base_init.hpp"
