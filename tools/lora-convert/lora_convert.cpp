// lora-convert: moves LoRA adapters between Hugging Face PEFT and llama.cpp's GGUF, for the llama
// family, without Python (see docs/gguf.md):
//   lora-convert peft-to-gguf ADAPTER_DIR BASE.gguf OUT.gguf [--outtype f32|f16|bf16|q8_0]
//   lora-convert gguf-to-peft ADAPTER.gguf BASE.gguf OUT_DIR
// The base model supplies the architecture, the head counts of the q/k permutation and the shapes
// the adapter is checked against. Any refusal is one line on stderr and exit status 1.
#include <lora/gguf.hpp>

#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

const char* kUsage =
    "usage:\n"
    "  lora-convert peft-to-gguf ADAPTER_DIR BASE.gguf OUT.gguf [--outtype f32|f16|bf16|q8_0]\n"
    "  lora-convert gguf-to-peft ADAPTER.gguf BASE.gguf OUT_DIR\n"
    "\n"
    "Converts LoRA adapters of llama-family models between Hugging Face PEFT directories\n"
    "(adapter_config.json + adapter_model.safetensors) and llama.cpp's GGUF adapters\n"
    "(llama-cli -m BASE.gguf --lora OUT.gguf). BASE.gguf is the model the adapter is for: it\n"
    "gives the architecture, the attention head counts (q_proj/k_proj rows are permuted per\n"
    "head as llama.cpp's converter permutes the model) and the shapes to check against.\n"
    "--outtype: the GGUF tensors' type (default f32; q8_0 needs ranks that are multiples of 32).\n";

int refuse(const std::string& what) {
  std::fprintf(stderr, "lora-convert: %s\n", what.c_str());
  return 1;
}

std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n') c = ' ';
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  for (const auto& a : args)
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
  if (args.empty()) return refuse("no command given (peft-to-gguf or gguf-to-peft; --help)");
  const std::string command = args[0];
  lora::io::GgmlType type = lora::io::GgmlType::F32;
  std::vector<std::string> positional;
  for (std::size_t i = 1; i < args.size(); ++i) {
    if (args[i] == "--outtype") {
      if (command != "peft-to-gguf") return refuse("--outtype is for peft-to-gguf only");
      if (i + 1 >= args.size()) return refuse("--outtype needs a value: f32, f16, bf16 or q8_0");
      const std::string t = args[++i];
      if (t == "f32")
        type = lora::io::GgmlType::F32;
      else if (t == "f16")
        type = lora::io::GgmlType::F16;
      else if (t == "bf16")
        type = lora::io::GgmlType::BF16;
      else if (t == "q8_0")
        type = lora::io::GgmlType::Q8_0;
      else
        return refuse("unknown --outtype \"" + t + "\" (f32, f16, bf16 or q8_0)");
    } else if (args[i].rfind("--", 0) == 0) {
      return refuse("unknown option \"" + args[i] + "\" (--help)");
    } else {
      positional.push_back(args[i]);
    }
  }
  if (command != "peft-to-gguf" && command != "gguf-to-peft")
    return refuse("unknown command \"" + command + "\" (peft-to-gguf or gguf-to-peft; --help)");
  if (positional.size() != 3)
    return refuse(command + " takes 3 arguments, got " + std::to_string(positional.size()) +
                  " (--help)");
  try {
    const lora::io::GgufFile base = lora::io::GgufFile::load(positional[1]);
    if (command == "peft-to-gguf") {
      lora::gguf::convert_peft_to_gguf(positional[0], base, positional[2], type);
    } else {
      lora::gguf::convert_gguf_to_peft(positional[0], base, positional[2]);
    }
  } catch (const std::exception& e) {
    return refuse(one_line(e.what()));
  }
  std::printf("lora-convert: wrote %s\n", positional[2].c_str());
  return 0;
}
