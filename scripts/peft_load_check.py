#!/usr/bin/env python3
"""Loads an adapter directory written by lora::peft::save_adapter with PEFT itself, as a user would.

    python3 scripts/peft_load_check.py ADAPTER_DIR [MODULES.safetensors]

Builds a torch model whose Linear layers sit at the adapter's module paths (shapes taken from
lora_A / lora_B; base weights and inputs from MODULES.safetensors when given, in the layout of
tests/fixtures/peft/*_modules.safetensors: <path with / for .>/W0, /x, /y), wraps it with
PeftModel.from_pretrained, checks that every tensor of the file landed in its module and, with
MODULES, reports the largest
relative difference between PEFT's output and the recorded one. Needs torch, safetensors and peft
(not installed on the build machine: this is for users who have them).
"""
import json
import os
import sys

try:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
except ImportError as e:  # pragma: no cover
    sys.exit(f"peft_load_check: needs torch, safetensors and peft ({e})")

PREFIX = "base_model.model."


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    adapter_dir = sys.argv[1]
    modules_file = sys.argv[2] if len(sys.argv) > 2 else None
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    config = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    shapes = {}
    for key, t in tensors.items():
        assert key.startswith(PREFIX), key
        path, _, rest = key[len(PREFIX):].rpartition(".lora_")
        if rest == "A.weight":
            shapes.setdefault(path, {})["in"] = t.shape[1]
        elif rest == "B.weight":
            shapes.setdefault(path, {})["out"] = t.shape[0]
    refs = load_file(modules_file) if modules_file else {}
    fan_in_fan_out = config.get("fan_in_fan_out", False)

    root = torch.nn.Module()
    for path, s in shapes.items():
        ref = "base_model/model/" + path.replace(".", "/")
        has_bias = ref + "/bias" in refs
        if fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D
            layer = Conv1D(s["out"], s["in"])
        else:
            layer = torch.nn.Linear(s["in"], s["out"], bias=has_bias)
        if ref + "/W0" in refs:
            with torch.no_grad():
                layer.weight.copy_(refs[ref + "/W0"])
                if has_bias:
                    layer.bias.copy_(refs[ref + "/bias"])
        parent = root
        *parents, name = path.split(".")
        for p in parents:
            if not hasattr(parent, p):
                parent.add_module(p, torch.nn.Module())
            parent = getattr(parent, p)
        parent.add_module(name, layer)

    model = PeftModel.from_pretrained(root, adapter_dir)
    model.eval()
    # Every tensor of the file must have landed in its module (PEFT only warns about key problems).
    for key, t in tensors.items():
        path, _, rest = key[len(PREFIX):].rpartition(".lora_")
        module = model.base_model.model.get_submodule(path)
        part = module.lora_A if rest.startswith("A") else module.lora_B
        loaded = part["default"].bias if rest.endswith("bias") else part["default"].weight
        torch.testing.assert_close(loaded.detach().to(t.dtype), t, rtol=0, atol=0, msg=key)
    worst = 0.0
    for path in shapes:
        ref = "base_model/model/" + path.replace(".", "/")
        if ref + "/x" not in refs:
            continue
        module = model.base_model.model.get_submodule(path)
        with torch.no_grad():
            y = module(refs[ref + "/x"])
        err = ((y - refs[ref + "/y"]).abs().max() / refs[ref + "/y"].abs().max()).item()
        worst = max(worst, err)
        print(f"{path:40s} max rel. difference {err:.2e}")
    print(f"loaded {len(shapes)} modules with PEFT; largest relative difference {worst:.2e}")
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
