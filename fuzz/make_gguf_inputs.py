#!/usr/bin/env python3
"""Writes the GGUF fuzz seeds (fuzz/seeds/gguf/*.gguf: small valid files of each kind) and the
hand-made hostile inputs (fuzz/regressions/gguf/*.gguf: one per class of malformed file).
Standard library only; rerun after editing. tests/test_gguf_container.cpp replays every file:
each seed must be accepted, each regression refused with a lora::io::FormatError."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = os.path.join(HERE, "seeds", "gguf")
REGRESSIONS = os.path.join(HERE, "regressions", "gguf")

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)


class Raw:
    def __init__(self):
        self.b = bytearray()

    def put(self, fmt, *v):
        self.b += struct.pack("<" + fmt, *v)
        return self

    def str(self, s):
        s = s.encode() if isinstance(s, str) else s
        return self.put("Q", len(s)).raw(s)

    def raw(self, data):
        self.b += data
        return self

    def header(self, n_tensors, n_kv, version=3):
        return self.raw(b"GGUF").put("I", version).put("q", n_tensors).put("q", n_kv)

    def kv_str(self, k, v):
        return self.str(k).put("i", STR).str(v)

    def kv_u32(self, k, v):
        return self.str(k).put("i", U32).put("I", v)

    def kv_f32(self, k, v):
        return self.str(k).put("i", F32).put("f", v)

    def kv_arr_str(self, k, vs):
        self.str(k).put("i", ARR).put("i", STR).put("Q", len(vs))
        for v in vs:
            self.str(v)
        return self

    def info(self, name, ne, ggml_type, offset):
        self.str(name).put("I", len(ne))
        for d in ne:
            self.put("q", d)
        return self.put("i", ggml_type).put("Q", offset)

    def pad(self, a=32):
        while len(self.b) % a:
            self.b.append(0)
        return self

    def data(self, n, fill=0):
        self.b += bytes([fill]) * n
        return self


def write(folder, name, raw):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name + ".gguf"), "wb") as f:
        f.write(bytes(raw.b))


def f32s(values):
    return b"".join(struct.pack("<f", v) for v in values)


def seeds():
    # A base-like file: architecture, counts, a vocabulary, f32/f16/bf16/q8_0 weights.
    r = Raw().header(4, 5)
    r.kv_str("general.architecture", "llama").kv_u32("llama.block_count", 1)
    r.kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    r.kv_arr_str("tokenizer.ggml.tokens", ["<unk>", "<s>", "</s>", "<0x00>"])
    r.kv_u32("general.alignment", 32)
    r.info("blk.0.attn_q.weight", [4, 2], 0, 0)    # f32, 32 bytes
    r.info("blk.0.attn_k.weight", [8, 2], 1, 32)   # f16, 32 bytes
    r.info("blk.0.attn_v.weight", [8, 2], 30, 64)  # bf16, 32 bytes
    r.info("blk.0.ffn_up.weight", [32, 1], 8, 96)  # q8_0, 34 bytes
    r.pad().raw(f32s([0.5 * i for i in range(8)]))
    r.raw(b"".join(struct.pack("<H", 0x3C00 + i) for i in range(16)))
    r.raw(b"".join(struct.pack("<H", 0x3F80 + i) for i in range(16)))
    r.raw(struct.pack("<H", 0x2000) + bytes(range(32))).pad()
    write(SEEDS, "base_f32_f16_bf16_q8_0", r)
    # A LoRA adapter for it.
    r = Raw().header(2, 4)
    r.kv_str("general.architecture", "llama").kv_str("general.type", "adapter")
    r.kv_str("adapter.type", "lora").kv_f32("adapter.lora.alpha", 4.0)
    r.info("blk.0.attn_q.weight.lora_a", [4, 1], 0, 0)  # A: ne [k, r]
    r.info("blk.0.attn_q.weight.lora_b", [1, 2], 0, 32)  # B: ne [r, d]
    r.pad().raw(f32s([0.1, 0.2, 0.3, 0.4])).pad().raw(f32s([1.0, -1.0])).pad()
    write(SEEDS, "adapter_f32", r)
    # A token embedding's adapter: lora_a is A transposed (ne [r, n_vocab]), lora_b is B (ne [r, d]).
    r = Raw().header(2, 4)
    r.kv_str("general.architecture", "llama").kv_str("general.type", "adapter")
    r.kv_str("adapter.type", "lora").kv_f32("adapter.lora.alpha", 2.0)
    r.info("token_embd.weight.lora_a", [1, 4], 0, 0)
    r.info("token_embd.weight.lora_b", [1, 2], 0, 32)
    r.pad().raw(f32s([0.1, 0.2, 0.3, 0.4])).pad().raw(f32s([1.0, -1.0])).pad()
    write(SEEDS, "adapter_token_embd_f32", r)
    # Every value type once, scalars and arrays, and no tensors.
    r = Raw().header(0, 13)
    for t, fmt, v in [(U8, "B", 7), (I8, "b", -7), (U16, "H", 7), (I16, "h", -7), (U32, "I", 7),
                      (I32, "i", -7), (F32, "f", 0.5), (BOOL, "B", 1), (U64, "Q", 7),
                      (I64, "q", -7), (F64, "d", 0.25)]:
        r.str("k%d" % t).put("i", t).put(fmt, v)
    r.kv_str("k8", "text")
    r.str("arr").put("i", ARR).put("i", I32).put("Q", 3).put("iii", 1, 2, 3)
    r.pad()
    write(SEEDS, "every_value_type", r)
    # A k-quant tensor lora hands out raw, and an alignment of 64.
    r = Raw().header(1, 1).kv_u32("general.alignment", 64)
    r.info("blk.0.ffn_down.weight", [256, 1], 12, 0).pad(64).data(144, 0x11).pad(64)
    write(SEEDS, "q4_k_align_64", r)


def regressions():
    def valid_infos(r):
        return r
    R = REGRESSIONS
    write(R, "huge-tensor-count", Raw().header(1 << 62, 0))
    write(R, "huge-kv-count", Raw().header(0, 1 << 62))
    write(R, "negative-count", Raw().header(-1, 0))
    write(R, "string-length-past-the-end", Raw().header(0, 1).put("Q", 1000000).data(8, 0x61))
    write(R, "string-length-over-1gib", Raw().header(0, 1).put("Q", 1 << 40).data(16, 0x61))
    write(R, "nested-array", Raw().header(0, 1).str("k").put("i", ARR).put("i", ARR).put("Q", 1)
          .put("i", U32).put("Q", 1).put("I", 5))
    write(R, "array-count-past-the-end", Raw().header(0, 1).str("k").put("i", ARR).put("i", U64)
          .put("Q", 1 << 29).data(64))
    write(R, "unknown-value-type", Raw().header(0, 1).str("k").put("i", 13).put("I", 0))
    write(R, "empty-key", Raw().header(0, 1).kv_str("", "x"))
    write(R, "duplicate-key", Raw().header(0, 2).kv_str("a", "x").kv_str("a", "y"))
    write(R, "alignment-not-a-power-of-two", Raw().header(0, 1).kv_u32("general.alignment", 48))
    write(R, "alignment-not-u32", Raw().header(0, 1).kv_f32("general.alignment", 32.0))
    write(R, "misaligned-offset", Raw().header(2, 0).info("a", [2], 0, 0).info("b", [2], 0, 8)
          .pad().data(64))
    write(R, "overlapping-offsets", Raw().header(2, 0).info("a", [8], 0, 0).info("b", [8], 0, 0)
          .pad().data(64))
    write(R, "tensor-past-the-end", Raw().header(1, 0).info("w", [64], 0, 0).pad().data(100))
    write(R, "data-section-past-the-end", Raw().header(1, 0).info("w", [8], 0, 0))
    write(R, "duplicate-tensor-name", Raw().header(2, 0).info("w", [8], 0, 0).info("w", [8], 0, 32)
          .pad().data(64))
    write(R, "tensor-name-64-bytes", Raw().header(1, 0).info("n" * 64, [8], 0, 0).pad().data(32))
    write(R, "unknown-ggml-type", Raw().header(1, 0).info("w", [8], 4, 0).pad().data(32))
    write(R, "partial-q8_0-block", Raw().header(1, 0).info("w", [33], 8, 0).pad().data(64))
    write(R, "n-dims-5", Raw().header(1, 0).info("w", [1, 1, 1, 1, 8], 0, 0).pad().data(32))
    write(R, "negative-dimension", Raw().header(1, 0).info("w", [8, -1], 0, 0).pad().data(32))
    write(R, "element-count-overflows", Raw().header(1, 0).info("w", [1 << 32, (1 << 31) + 1], 0, 0)
          .pad().data(32))
    write(R, "element-count-wraps-to-zero", Raw().header(1, 0).info("w", [1 << 32, 1 << 32], 0, 0)
          .pad().data(32))
    write(R, "byte-size-overflows", Raw().header(1, 0).info("w", [1 << 62], 28, 0).pad().data(32))
    write(R, "version-1", Raw().header(0, 0, 1))
    write(R, "big-endian", Raw().header(0, 0, 0x03000000))


if __name__ == "__main__":
    seeds()
    regressions()
