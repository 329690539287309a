"""The llama example's LoRA training step in PyTorch: `compare_pytorch.py llama` runs it.

The same model and step as llama_benchmarks' BM_LlamaTrainStep (examples/llama): n_embd 512,
8 blocks, 8 heads (2 key/value heads), n_ff 1376, a 259-token vocabulary, RMSNorm, rotary embedding
on adjacent pairs (llama.cpp's norm mode), grouped-query causal attention, SwiGLU, an untied output;
every weight frozen, LoRA (r = 8, alpha = 16, PEFT's Linear: base(x) + B(A(x)) * s) on the seven
projections of every block; one step is 4 sequences of 256 tokens: forward, cross-entropy, backward,
clip_grad_norm_(1.0), AdamW. float32. Prints

  llama_step_ms=... tokens_per_s=... peak_rss_mb=... threads=... torch=...
"""

import argparse
import json
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

CFG = dict(n_vocab=259, n_embd=512, n_layer=8, n_head=8, n_head_kv=2, n_ff=1376, seq=256, batch=4,
           rank=8, alpha=16.0, eps=1e-5, rope_base=10000.0)


class LoRALinear(torch.nn.Module):
    """A frozen weight (out x in) with PEFT's LoRA: F.linear(x, W) + B(A(x)) * s."""

    def __init__(self, out_f, in_f, rank, alpha):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_f, in_f) / in_f ** 0.5, requires_grad=False)
        self.A = torch.nn.Parameter(torch.randn(rank, in_f) / rank)
        self.B = torch.nn.Parameter(torch.zeros(out_f, rank))
        self.s = alpha / rank

    def forward(self, x):
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.A), self.B) * self.s


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, cos, sin):
    """x: (batch, heads, seq, head_dim); rotates adjacent pairs (x_2i, x_2i+1)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class Model(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        E, hd = c["n_embd"], c["n_embd"] // c["n_head"]
        kv = hd * c["n_head_kv"]
        r, a = c["rank"], c["alpha"]
        self.embd = torch.nn.Parameter(torch.randn(c["n_vocab"], E), requires_grad=False)
        self.blocks = torch.nn.ModuleList()
        for _ in range(c["n_layer"]):
            b = torch.nn.Module()
            b.attn_norm = torch.nn.Parameter(torch.ones(E), requires_grad=False)
            b.ffn_norm = torch.nn.Parameter(torch.ones(E), requires_grad=False)
            b.q, b.k, b.v, b.o = (LoRALinear(E, E, r, a), LoRALinear(kv, E, r, a),
                                  LoRALinear(kv, E, r, a), LoRALinear(E, E, r, a))
            b.gate, b.up = LoRALinear(c["n_ff"], E, r, a), LoRALinear(c["n_ff"], E, r, a)
            b.down = LoRALinear(E, c["n_ff"], r, a)
            self.blocks.append(b)
        self.out_norm = torch.nn.Parameter(torch.ones(E), requires_grad=False)
        self.output = torch.nn.Parameter(torch.randn(c["n_vocab"], E) / E ** 0.5, requires_grad=False)
        pos = torch.arange(c["seq"], dtype=torch.float64)[:, None]
        inv = c["rope_base"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        self.cos, self.sin = torch.cos(pos * inv).float(), torch.sin(pos * inv).float()
        self.mask = torch.full((c["seq"], c["seq"]), float("-inf")).triu(1)

    def forward(self, tokens):
        c = self.c
        Bn, L = tokens.shape
        H, Hkv, hd = c["n_head"], c["n_head_kv"], c["n_embd"] // c["n_head"]
        x = self.embd[tokens]
        for b in self.blocks:
            n = rms_norm(x, b.attn_norm, c["eps"])
            q = b.q(n).view(Bn, L, H, hd).transpose(1, 2)
            k = b.k(n).view(Bn, L, Hkv, hd).transpose(1, 2)
            v = b.v(n).view(Bn, L, Hkv, hd).transpose(1, 2)
            q, k = rope(q, self.cos[:L], self.sin[:L]), rope(k, self.cos[:L], self.sin[:L])
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
            att = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5 + self.mask[:L, :L], dim=-1)
            x = x + b.o((att @ v).transpose(1, 2).reshape(Bn, L, -1))
            m = rms_norm(x, b.ffn_norm, c["eps"])
            x = x + b.down(F.silu(b.gate(m)) * b.up(m))
        return F.linear(rms_norm(x, self.out_norm, c["eps"]), self.output)


def main(argv):
    ap = argparse.ArgumentParser(prog="compare_pytorch.py llama", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c = CFG
    model = Model(c)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    tokens = torch.randint(0, c["n_vocab"], (c["batch"], c["seq"]))

    def step():
        opt.zero_grad(set_to_none=False)
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, c["n_vocab"]), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    step()
    step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    ms = statistics.median(times)
    result = dict(llama_step_ms=ms, tokens_per_s=c["batch"] * c["seq"] / (ms / 1e3),
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                  threads=torch.get_num_threads(), torch=torch.__version__)
    print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
