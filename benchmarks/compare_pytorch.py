#!/usr/bin/python3
"""Side-by-side of lora_benchmarks and PyTorch (CPU) running PEFT's formulas on the same shapes.

Usage:
  OMP_NUM_THREADS=2 build/benchmarks/lora_benchmarks --benchmark_repetitions=5 \\
      --benchmark_report_aggregates_only=true --benchmark_out=lora.json \\
      --benchmark_out_format=json
  /usr/bin/python3 benchmarks/compare_pytorch.py lora.json            # same thread count
  ... --json-out both.json     also writes every row (lora ms, PyTorch ms, ratios) as JSON, with
                               PyTorch's version, BLAS and OpenBLAS core, for scripts/render_docs

PyTorch side (x is n x k, PEFT's layout; W is d x k as torch.nn.Linear.weight):
  DenseForward        F.linear(x, W)
  LoRAForward         base(x) + lora_B(lora_A(x)) * scaling            (PEFT's Linear.forward)
  MergedForward       F.linear(x, W + scaling * B @ A)
  TrainStep           forward, then y.backward(g) by autograd with x.requires_grad (dX included)
  TrainStepNoInputGrad  the same with x.requires_grad = False
  Merge / Unmerge     W += scaling * B @ A  /  W -= scaling * B @ A     (PEFT's merge)
  WeightCopy          W2.copy_(W)
  DoRAForward         PEFT's DoRA (Linear.forward + DoraLinearLayer.forward): B @ A formed
                      through an identity input, the norm of W + scaling * B @ A per row,
                      result + (m / norm - 1) * result + (m / norm) * lora_B(lora_A(x)) * scaling
  DoRATrainStep       that forward, then y.backward(g) (dA, dB, dm, dX; the norm detached)
  ...Bf16             the same under torch.autocast('cpu', dtype=torch.bfloat16), PyTorch's own
                      mixed precision; MergeBf16 adds the delta into a bf16 weight.

The llama example's LoRA training step (llama_benchmarks' BM_LlamaTrainStep) in PyTorch:
  /usr/bin/python3 benchmarks/compare_pytorch.py llama [--threads T] [--json FILE]
prints llama_step_ms=... tokens_per_s=... peak_rss_mb=... (benchmarks/pytorch_llama.py).

Needs PyTorch (Debian: apt-get install python3-torch, for /usr/bin/python3); installs nothing.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    sys.exit("compare_pytorch.py needs PyTorch: apt-get install python3-torch "
             "(then run it with /usr/bin/python3)")

UNIT_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}


def read_lora(path):
    """{(family, (n, k, d, r)): median real time in ms} from lora_benchmarks' JSON."""
    with open(path) as f:
        data = json.load(f)
    times, runs = {}, {}
    for b in data["benchmarks"]:
        m = re.match(r"(BM_\w+)/(\d+)/(\d+)/(\d+)/(\d+)", b["name"])
        if not m or b.get("error_occurred"):
            continue
        key = (m.group(1)[3:], tuple(int(g) for g in m.group(2, 3, 4, 5)))
        ms = b["real_time"] * UNIT_MS[b.get("time_unit", "ns")]
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                times[key] = ms
        else:
            runs.setdefault(key, []).append(ms)
    for key, values in runs.items():
        times.setdefault(key, statistics.median(values))
    return data.get("context", {}), times


def measure(fn, min_time, repetitions):
    """Median over repetitions of the mean time (ms) of fn() over at least min_time seconds."""
    fn()
    fn()  # warm-up: allocator, autograd graph, oneDNN primitive caches
    results = []
    for _ in range(repetitions):
        count, start = 0, time.perf_counter()
        while True:
            fn()
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        results.append(elapsed / count * 1e3)
    return statistics.median(results)


def torch_times(shape, families, min_time, repetitions):
    n, k, d, r = shape
    torch.manual_seed(0)
    s = 2.0  # alpha = 2r, as the C++ benchmarks
    W = torch.randn(d, k) / k ** 0.5
    A = torch.nn.Parameter(torch.randn(r, k) / r)
    B = torch.nn.Parameter(torch.randn(d, r) * 0.01)
    x = torch.randn(n, k)
    g = torch.randn(n, d)
    m = torch.nn.Parameter(W.norm(dim=1) * (1 + 0.2 * torch.randn(d)))  # lora_magnitude_vector
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    eye = torch.eye(k)

    def dora_forward(inp):  # PEFT 0.21: lora/layer.py Linear.forward and lora/dora.py
        result = F.linear(inp, W)  # the base layer's output (no dropout: base_result = result)
        lora_weight = F.linear(F.linear(eye, A), B).T  # B @ A, formed as PEFT does (FSDP-safe)
        weight_norm = (W + s * lora_weight.detach()).norm(p=2, dim=1).detach()
        mag_norm_scale = (m / weight_norm).view(1, -1)
        lora_result = F.linear(F.linear(inp, A), B)
        return result + (mag_norm_scale - 1) * result + mag_norm_scale * lora_result * s

    def dora_step():
        xi = x.detach().requires_grad_(True)
        A.grad = B.grad = m.grad = None
        dora_forward(xi).backward(g)

    def lora_forward(inp):  # PEFT: result = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling
        return F.linear(inp, W) + F.linear(F.linear(inp, A), B) * s

    def step(input_grad, autocast):
        xi = x.detach().requires_grad_(input_grad)
        A.grad = B.grad = None
        if autocast:
            with bf16():
                y = lora_forward(xi)
        else:
            y = lora_forward(xi)
        y.backward(g)

    W_merged = W + s * (B.detach() @ A.detach())
    W_copy = torch.empty_like(W)
    W_bf16 = W.to(torch.bfloat16)
    out = {}

    def run(name, fn):
        if name in families:
            out[name] = measure(fn, min_time, repetitions)

    with torch.no_grad():
        run("DenseForward", lambda: F.linear(x, W))
        run("LoRAForward", lambda: lora_forward(x))
        run("DoRAForward", lambda: dora_forward(x))
        run("MergedForward", lambda: F.linear(x, W_merged))
        run("Merge", lambda: W.add_(s * (B @ A)))  # PEFT's merge; Unmerge undoes it
        run("Unmerge", lambda: W.sub_(s * (B @ A)))
        run("WeightCopy", lambda: W_copy.copy_(W))
        with bf16():
            run("DenseForwardBf16", lambda: F.linear(x, W))
            run("LoRAForwardBf16", lambda: lora_forward(x))
            run("MergedForwardBf16", lambda: F.linear(x, W_merged))
        run("MergeBf16", lambda: W_bf16.add_(s * (B @ A)))
    run("TrainStep", lambda: step(True, False))
    run("TrainStepNoInputGrad", lambda: step(False, False))
    run("DoRATrainStep", dora_step)
    run("TrainStepBf16", lambda: step(True, True))
    run("TrainStepNoInputGradBf16", lambda: step(False, True))
    return out


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "llama":  # the llama example's step (pytorch_llama.py)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import pytorch_llama
        return pytorch_llama.main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="lora_benchmarks --benchmark_out=FILE --benchmark_out_format=json")
    ap.add_argument("--threads", type=int, default=None,
                    help="PyTorch threads (default: the count the C++ run used)")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per repetition")
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--shapes", default=None, help="only shapes matching this regex, e.g. 512/4096")
    ap.add_argument("--json-out", default=None, help="also write the rows as JSON to this file")
    ap.add_argument("--families", default=None,
                    help="only families matching this regex, e.g. Bf16 or '^(Dense|LoRA)Forward$'")
    args = ap.parse_args()

    context, lora = read_lora(args.json)
    threads = args.threads or int(context.get("lora_eigen_threads",
                                              os.environ.get("OMP_NUM_THREADS", "1")))
    torch.set_num_threads(threads)
    print(f"threads: {threads} (lora run: {context.get('lora_eigen_threads', '?')}); "
          f"torch {torch.__version__}; lora bf16 back end: {context.get('lora_bf16_backend', '?')}")

    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    libblas = os.path.realpath("/usr/lib/x86_64-linux-gnu/libblas.so.3")
    if blas and blas.group(1) == "generic" and "openblas" not in libblas.lower():
        print(f"WARNING: this PyTorch runs its fp32 products on the system libblas ({libblas}). "
              "Debian's reference BLAS is some 20x slower than OpenBLAS, which makes PyTorch's "
              "fp32 rows meaningless; for a fair comparison: apt-get install libopenblas0-pthread")
    rows = []
    shapes = sorted({shape for _, shape in lora}, key=lambda s: (-s[1] * s[2] * s[0], s))
    if args.shapes:
        shapes = [s for s in shapes if re.search(args.shapes, "/".join(map(str, s)))]
    header = f"{'benchmark':<26}{'n/k/d/r':>18}{'lora ms':>10}{'x dense':>9}" \
             f"{'torch ms':>10}{'x dense':>9}{'torch/lora':>12}"
    print(header)
    print("-" * len(header))
    for shape in shapes:
        families = sorted({fam for fam, s in lora if s == shape
                           and (not args.families or re.search(args.families, fam))})
        strip = lambda f: next((f[:-len(x)] for x in ("OneDnn", "Eigen") if f.endswith(x)), f)
        suffix = lambda f: next((x for x in ("Bf16", "OneDnn", "Eigen") if f.endswith(x)), "")
        base = [strip(f) for f in families]
        theirs = torch_times(shape, set(base), args.min_time, args.repetitions)
        for fam in families:
            mine = lora[(fam, shape)]
            dense_fam = "DenseForward" + suffix(fam)
            if "merge" in fam.lower() and "Forward" not in fam or fam == "WeightCopy":
                dense_fam = "WeightCopy"  # merge is memory-bound: its yardstick is a copy
            torch_fam = strip(fam)
            ratio = mine / lora[(dense_fam, shape)] if (dense_fam, shape) in lora else float("nan")
            t = theirs.get(torch_fam)
            torch_dense = theirs.get(strip(dense_fam))
            t_ratio = t / torch_dense if t and torch_dense else float("nan")
            rows.append({"family": fam, "shape": "/".join(map(str, shape)), "lora_ms": mine,
                         "lora_x_dense": ratio, "torch_ms": t, "torch_x_dense": t_ratio,
                         "torch_over_lora": t / mine if t else None})
            print(f"{fam:<26}{'/'.join(map(str, shape)):>18}{mine:>10.3f}{ratio:>9.3f}"
                  + (f"{t:>10.3f}{t_ratio:>9.3f}{t / mine:>11.2f}x" if t else f"{'-':>10}"))
        print()
    print("x dense: time / the dense product of the same precision in the same run "
          "(merge, unmerge: / WeightCopy). torch/lora > 1: lora is faster.")
    if args.json_out:
        core = None
        try:  # the OpenBLAS core PyTorch's products run on (through libblas.so.3)
            import ctypes
            lib = ctypes.CDLL(libblas)
            lib.openblas_get_corename.restype = ctypes.c_char_p
            core = lib.openblas_get_corename().decode()
        except (OSError, AttributeError):
            pass
        with open(args.json_out, "w") as f:
            json.dump({"threads": threads, "torch": torch.__version__, "libblas": libblas,
                       "openblas_core": core, "lora_context": context, "rows": rows}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
