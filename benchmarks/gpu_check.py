"""GPU sanity check of every layer-level method: fp32 forward == F.linear(effective_weight) on CUDA,
bf16 autocast forward/backward finite, merge/unmerge exact. Prints one line per method.

    python benchmarks/gpu_check.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bora_lab import methods  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    dev = "cuda"
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for name in methods.available():
        if methods.info(name)["kind"] != "layer":
            continue
        torch.manual_seed(0)
        try:
            layer = methods.wrap(nn.Linear(512, 256).to(dev), name, rank=8)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{name:<10} build failed: {e}")
            continue
        with torch.no_grad():
            for p in layer.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        x = torch.randn(64, 512, device=dev)
        err = (layer(x) - F.linear(x, layer.effective_weight(), layer.bias)).abs().max().item()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.float().pow(2).mean().backward()
        finite = all(torch.isfinite(p.grad).all().item() for p in layer.parameters() if p.grad is not None)
        w0 = layer.base.weight.detach().clone()
        merged_ok = "n/a"
        if methods.info(name)["mergeable"]:
            y0 = layer(x).detach()
            layer.merge()
            d = (layer(x) - y0).abs().max().item()
            layer.unmerge()
            merged_ok = f"{d:.1e}, W0 restored={torch.equal(layer.base.weight, w0)}"
        print(f"{name:<10} fp32 |fwd - F.linear(W)| = {err:.1e}  bf16 {y.dtype} grads finite={finite}  merge {merged_ok}")


if __name__ == "__main__":
    main()
