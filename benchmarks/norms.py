"""DoRA/BoRA norms: the dense ``V = W0 + s·B@A`` against the factored formulas, interleaved on CPU.

    python benchmarks/norms.py                    # all shapes and ranks, 512 tokens, 21 repetitions
    python benchmarks/norms.py --reps 31 --tokens 2048 --methods dora_col

For each method (dora: row norms, dora_col: column norms, bora: row norms then the column norms
of ``diag(m_r/||V||_row) V``; Liu et al. 2024, arXiv:2402.09353; Wang et al. 2024,
arXiv:2412.06441, §3.2, eq. 3), shape ``[out, in]`` (MiniLM's 384×384 and 1536×384, a
Llama-like 2048×2048) and rank it times, in fp32:

* ``norm``: the norms alone, as a training step computes them by default (``detach_norm=True``:
  under ``no_grad``);
* ``step``: forward + backward of the adapter layer on ``tokens`` input rows (``detach_norm=True``);
* ``step nd``: the same with ``detach_norm=False`` (gradients flow through the norms).

One layer serves both paths (its ``norm_path`` switches between "dense" and "factored"), and the
two paths take turns repetition by repetition in one process, so drifts in machine speed hit both
alike. Prints the median times, ``ratio = factored / dense`` of the medians (below 1: factored is
faster) and the same ratio of the fastest repetitions (``min ratio``: noise from other processes
only adds time, so it is the steadier figure on a shared machine) and the path the layer's
measured rule picks there (``rule``: base.prefer_factored). Run it alone on the machine:
two busy processes on two cores distort every figure.

At 2048×2048 the dense path's time depends on the allocator: with glibc's defaults a freed 16 MB
temporary may go back to the OS, and the next one is page-faulted afresh (several ms each). To see
the figures with the memory kept in the heap, run it as
``MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=8000000000 python benchmarks/norms.py``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bora_lab import methods  # noqa: E402
from bora_lab.methods.base import prefer_factored  # noqa: E402

SHAPES = [(384, 384), (1536, 384), (2048, 2048)]  # (out, in)
RANKS = [8, 64, 256]
METHODS = ["dora", "dora_col", "bora"]
PATHS = ["dense", "factored"]


def make_layer(method: str, d_out: int, d_in: int, rank: int, detach: bool) -> methods.AdapterLinear:
    torch.manual_seed(0)
    layer = methods.wrap(nn.Linear(d_in, d_out), method, rank=rank, alpha=2 * rank, detach_norm=detach)
    with torch.no_grad():  # away from B = 0, as after some training
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    return layer


def norm_fn(layer):
    """The norms alone, as the layer's forward takes them with ``detach_norm=True``."""
    def run():
        with torch.no_grad():
            return layer._norms() if hasattr(layer, "_norms") else layer.direction_norm()
    return run


def step_fn(layer, x):
    """Forward + backward of the layer (gradients of A, B, the magnitudes and of ``x``, as for a
    layer inside a network whose earlier layers are adapted too)."""
    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).square().mean().backward()
    return run


def time_interleaved(layer, fn, reps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each call of ``fn`` per path, the paths taking turns within each repetition."""
    times = {p: [] for p in PATHS}
    for i in range(warmup + reps):
        for path in PATHS if i % 2 == 0 else reversed(PATHS):
            layer.norm_path = path
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[path].append(dt)
    return times


def check_same(layer) -> float:
    """Largest relative difference of the two paths' norms (a guard that both compute the same)."""
    out = {}
    for path in PATHS:
        layer.norm_path = path
        got = norm_fn(layer)()
        out[path] = torch.cat(got) if isinstance(got, tuple) else got
    return ((out["dense"] - out["factored"]).abs() / out["dense"].abs()).max().item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--tokens", type=int, default=512, help="input rows of the forward/backward step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, median of {args.reps} interleaved "
          f"repetitions, step = forward+backward on {args.tokens} tokens; ratio = factored / dense")
    head = (f"{'method':<9}{'out×in':>10}{'r':>5}{'r/min':>7} | {'measure':<8}{'dense ms':>9}{'fact. ms':>9}"
            f"{'ratio':>7}{'min ratio':>10}{'rule':>7}")
    print(head)
    print("-" * len(head))
    for method in args.methods.split(","):
        for d_out, d_in in SHAPES:
            for rank in RANKS:
                if rank > min(d_out, d_in):
                    continue
                x = torch.randn(args.tokens, d_in, requires_grad=True)
                layer = make_layer(method, d_out, d_in, rank, detach=True)
                layer_nd = make_layer(method, d_out, d_in, rank, detach=False)
                err = check_same(layer)
                rows = [("norm", time_interleaved(layer, norm_fn(layer), args.reps)),
                        ("step", time_interleaved(layer, step_fn(layer, x), args.reps)),
                        ("step nd", time_interleaved(layer_nd, step_fn(layer_nd, x), args.reps))]
                for k, (measure, t) in enumerate(rows):
                    rule = prefer_factored(method, rank, d_out, d_in, detach_norm=measure != "step nd")
                    label = (f"{method:<9}{f'{d_out}×{d_in}':>10}{rank:>5}{rank / min(d_out, d_in):>7.3f}" if k == 0
                             else " " * 31)
                    med = {p: statistics.median(v) for p, v in t.items()}
                    print(f"{label} | {measure:<8}{1e3 * med['dense']:>9.2f}{1e3 * med['factored']:>9.2f}"
                          f"{med['factored'] / med['dense']:>7.2f}{min(t['factored']) / min(t['dense']):>10.2f}"
                          f"{'fact.' if rule else 'dense':>7}"
                          + (f"   (max rel. diff {err:.1e})" if k == 0 else ""), flush=True)


if __name__ == "__main__":
    main()
