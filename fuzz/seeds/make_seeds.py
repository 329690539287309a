#!/usr/bin/env python3
"""Writes the small hand-made seed files in fuzz/seeds/safetensors, fuzz/seeds/peft_adapter (the
PEFT fixtures in tests/fixtures/peft are seeds too) and fuzz/seeds/ggml_blocks. Standard library
only; rerun after editing."""
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

# PEFT adapter seeds: 4-byte little-endian config length, adapter_config.json, then
# adapter_model.safetensors (fuzz/peft_adapter_harness.hpp).
PEFT = os.path.join(os.path.dirname(HERE), "peft_adapter")
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures",
                        "peft")
os.makedirs(PEFT, exist_ok=True)


def write_adapter(name, config, weights):
    with open(os.path.join(PEFT, name + ".bin"), "wb") as f:
        f.write(struct.pack("<I", len(config)) + config + weights)


def safetensors(header, data=b""):
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + data


for d in sorted(os.listdir(FIXTURES)):
    cfg = os.path.join(FIXTURES, d, "adapter_config.json")
    if os.path.isfile(cfg):
        with open(cfg, "rb") as c, open(os.path.join(FIXTURES, d, "adapter_model.safetensors"),
                                        "rb") as w:
            write_adapter(d, c.read(), w.read())

# Small hand-made adapters: one 2 x 3 module of rank 1, with and without patterns and lora_bias.
A = struct.pack("<3f", 0.5, -1, 2)
B = struct.pack("<2f", 1, -0.25)
pair = {"base_model.model.layer.q.lora_A.weight": entry("F32", [1, 3], 0, 12),
        "base_model.model.layer.q.lora_B.weight": entry("F32", [2, 1], 12, 20)}
write_adapter("tiny", json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2,
                                  "target_modules": ["q"]}).encode(), safetensors(pair, A + B))
write_adapter("tiny_patterns", json.dumps(
    {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": "layer\\.q",
     "rank_pattern": {"q": 1}, "alpha_pattern": {"layer.q": 3}}).encode(), safetensors(pair, A + B))
biased = dict(pair)
biased["base_model.model.layer.q.lora_B.bias"] = entry("BF16", [2], 20, 24)
write_adapter("tiny_lora_bias", json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1,
                                            "lora_bias": True}).encode(),
              safetensors(biased, A + B + bytes([0x80, 0x3F, 0x00, 0x40])))

# ggml block seeds (fuzz/ggml_blocks_harness.hpp): one byte choosing the type, then whole blocks.
# Per type, "<type>" holds finite blocks (all zero, fp16 scales of 65504 and of 2^-24, an
# ordinary one, random bytes under a finite scale), "<type>_nonfinite" a block with each of the
# scales +inf (0x7c00), NaN (0x7e00) and a signalling NaN (0x7c01): GgmlFrozenWeight refuses it.
GGML = os.path.join(os.path.dirname(HERE), "ggml_blocks")
os.makedirs(GGML, exist_ok=True)
# name: (type byte, bytes per block, offsets of the fp16 scales in a block)
GGML_TYPES = {"f32": (0, 4, []), "f16": (1, 2, []), "bf16": (2, 2, []), "q8_0": (3, 34, [0]),
              "q4_0": (4, 18, [0]), "q5_0": (5, 22, [0]), "q4_K": (6, 144, [0, 2]),
              "q5_K": (7, 176, [0, 2]), "q6_K": (8, 210, [208])}


def lcg_bytes(n, state):
    out = bytearray()
    for _ in range(n):
        state = (state * 1664525 + 1013904223) % 2**32
        out.append(state >> 24)
    return out


def block(size, scales, fill, scale):
    b = bytearray(fill)
    for off in scales:
        b[off:off + 2] = struct.pack("<H", scale)
    return bytes(b)


def write_ggml(name, type_byte, data):
    with open(os.path.join(GGML, name + ".bin"), "wb") as f:
        f.write(bytes([type_byte]) + data)


for name, (type_byte, size, scales) in GGML_TYPES.items():
    if not scales:  # plain values
        if name == "f32":
            finite = struct.pack("<8f", 0, -0.0, 1, -2.5, 1e-45, 3.4e38, -1e-38, 0.1)
            nonfinite = struct.pack("<4f", 1, float("inf"), float("nan"), -2)
            nonfinite += struct.pack("<I", 0x7F800001)  # signalling NaN
        elif name == "f16":
            finite = struct.pack("<8H", 0, 0x8000, 0x3C00, 0xC100, 0x0001, 0x7BFF, 0x0400, 0x3555)
            nonfinite = struct.pack("<6H", 0x3C00, 0x7C00, 0x7E00, 0x7C01, 0xFC00, 0xFE01)
        else:
            finite = struct.pack("<8H", 0, 0x8000, 0x3F80, 0xC020, 0x0001, 0x7F7F, 0x0080, 0x3DCD)
            nonfinite = struct.pack("<6H", 0x3F80, 0x7F80, 0x7FC0, 0x7F81, 0xFF80, 0xFFC1)
        write_ggml(name, type_byte, finite)
        write_ggml(name + "_nonfinite", type_byte, nonfinite)
        continue
    noise = lcg_bytes(size, type_byte)
    finite = (block(size, scales, bytes(size), 0) +        # all zero
              block(size, scales, noise, 0x7BFF) +          # largest fp16 scale
              block(size, scales, noise, 0x0001) +          # smallest subnormal scale
              block(size, scales, noise, 0x2E66))           # 0.1
    nonfinite = b"".join(block(size, scales, noise, s) for s in (0x3C00, 0x7C00, 0x7E00, 0x7C01))
    write_ggml(name, type_byte, finite)
    write_ggml(name + "_nonfinite", type_byte, nonfinite)
