#!/usr/bin/env python3
"""Writes the hand-made hostile inputs of fuzz/regressions/ that are easier to describe than to
keep by hand (issue "hostile files and failing disks"). Standard library only; rerun after editing.
tests/test_fuzz_regressions.cpp replays every file here and states what each must give."""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
PEFT = os.path.join(HERE, "peft_adapter")
SAFETENSORS = os.path.join(HERE, "safetensors")


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def safetensors(header, data=b"", header_text=None):
    text = header_text if header_text is not None else json.dumps(
        header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + data


def write_peft(name, config, weights):
    if isinstance(config, dict):
        config = json.dumps(config).encode()
    with open(os.path.join(PEFT, name + ".bin"), "wb") as f:
        f.write(struct.pack("<I", len(config)) + config + weights)


def write_safetensors(name, data):
    with open(os.path.join(SAFETENSORS, name + ".safetensors"), "wb") as f:
        f.write(data)


# One 2 x 3 module of rank 1 (as fuzz/seeds/make_seeds.py's "tiny").
A = struct.pack("<3f", 0.5, -1, 2)
B = struct.pack("<2f", 1, -0.25)
KA, KB = "base_model.model.layer.q.lora_A.weight", "base_model.model.layer.q.lora_B.weight"
PAIR = safetensors({KA: entry("F32", [1, 3], 0, 12), KB: entry("F32", [2, 1], 12, 20)}, A + B)
CONFIG = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q"]}

write_peft("target-modules-regex-20000-nested-groups",
           dict(CONFIG, target_modules="(" * 20000 + "layer\\.q" + ")" * 20000), PAIR)
write_peft("peft-type-null", dict(CONFIG, peft_type=None), PAIR)
write_peft("r-null", dict(CONFIG, r=None), PAIR)
write_peft("lora-alpha-1e40-for-float", dict(CONFIG, lora_alpha=1e40), PAIR)
write_peft("alpha-pattern-1e40-for-float", dict(CONFIG, alpha_pattern={"q": 1e40}), PAIR)
write_peft("f64-1e300-in-lora-A-for-float", CONFIG,
           safetensors({KA: entry("F64", [1, 3], 0, 24), KB: entry("F32", [2, 1], 24, 32)},
                       struct.pack("<3d", 0.5, 1e300, 2) + B))
write_peft("nan-in-lora-B", CONFIG,
           safetensors({KA: entry("F32", [1, 3], 0, 12), KB: entry("F32", [2, 1], 12, 20)},
                       A + struct.pack("<2f", 1, float("nan"))))
write_peft("config-nul-then-garbage", json.dumps(CONFIG).encode() + b"\0{]]garbage", PAIR)
write_peft("weights-duplicate-key", CONFIG, safetensors(None, A + B, header_text=(
    '{"%s":{"dtype":"F32","shape":[1,3],"data_offsets":[0,12]},'
    '"%s":{"dtype":"F32","shape":[2,1],"data_offsets":[12,20]},'
    '"%s":{"dtype":"F32","shape":[2,1],"data_offsets":[12,20]}}' % (KA, KB, KB)).encode()))

F32 = struct.pack("<4f", 1, 2, 3, 4)
write_safetensors("duplicate-key-last-would-win", safetensors(None, F32, header_text=(
    b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
    b'"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}')))
ok = json.dumps({"w": entry("F32", [2, 2], 0, 16)}, separators=(",", ":")).encode()
write_safetensors("header-padded-with-nul-then-garbage",
                  safetensors(None, F32, header_text=ok + b"\0\0{]garbage"))
write_safetensors("gap-between-tensors",
                  safetensors({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)},
                              F32[:12]))
write_safetensors("bytes-after-the-last-tensor",
                  safetensors({"a": entry("F32", [2], 0, 8)}, F32))
write_safetensors("header-nested-100-deep",
                  safetensors(None, b"", header_text=b'{"__metadata__":' + b"[" * 100 +
                              b"]" * 100 + b"}"))
