#!/usr/bin/env python3
"""Writes the small hand-made seed files in fuzz/seeds/safetensors (the PEFT fixtures in
tests/fixtures/peft are seeds too). Standard library only; rerun after editing."""
import json
import os
import struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "safetensors")


def write(name, header, data=b""):
    text = json.dumps(header, separators=(",", ":")).encode()
    with open(os.path.join(HERE, name + ".safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


f32 = struct.pack("<4f", 1, 2, 3, 4)
write("empty", {})
write("f32_matrix", {"w": entry("F32", [2, 2], 0, 16)}, f32)
write("f64_vector", {"v": entry("F64", [2], 0, 16)}, struct.pack("<2d", 1.5, -2))
write("half_types", {"h": entry("F16", [2], 0, 4), "b": entry("BF16", [2], 4, 8)},
      bytes([0x00, 0x3C, 0x00, 0xC0, 0x80, 0x3F, 0x00, 0x40]))
write("metadata", {"__metadata__": {"format": "pt"}, "s": entry("F32", [], 0, 4)}, f32[:4])
write("int_and_zero", {"i": entry("I32", [1, 3], 0, 12), "z": entry("F32", [0, 5], 12, 12)}, f32[:12])
write("lora_pair", {"base_model.model.q.lora_A.weight": entry("F32", [1, 2], 0, 8),
                    "base_model.model.q.lora_B.weight": entry("BF16", [2, 1], 8, 12)},
      f32[:8] + bytes([0x80, 0x3F, 0x00, 0x40]))
