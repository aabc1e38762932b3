"""One comparison on several processes: the entry point for ``accelerate launch`` and ``torchrun``.

    accelerate launch --num_processes 4 -m bora_lab.engine.launch --config cfg.json --out runs/big
    torchrun --nproc_per_node 2 -m bora_lab.engine.launch --config cfg.json --out runs/big steps=200

Every process trains every run data-parallel (:mod:`bora_lab.engine.dataparallel`); rank 0 alone
prints the progress and writes the results folder, the same files as ``bora-lab compare --out``.
``--config`` is a JSON object of ``RunConfig`` settings: a run's ``config.json``, or a lesson's
JSON (its ``"settings"``); ``KEY=VALUE`` arguments override it (a JSON value, else text).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..config import RunConfig
from . import dataparallel
from .trainer import run


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bora_lab.engine.launch", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, metavar="FILE", help="JSON of RunConfig settings")
    p.add_argument("--out", metavar="DIR", help="results folder (written by rank 0)")
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="settings that override the file's")
    args = p.parse_args(argv)
    with open(args.config, encoding="utf-8") as f:
        data = json.load(f)
    data = data.get("settings", data) if isinstance(data.get("settings"), dict) else data
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"expected KEY=VALUE, got {item!r}")
        data[key.strip()] = _value(value)
    cfg = RunConfig.from_dict(data)
    main_process = dataparallel.rank() == 0

    def show(ev) -> None:
        if ev.kind == "progress" and (ev.done_steps % 10 == 0 or ev.done_steps == ev.total_steps):
            print(f"step {ev.done_steps}/{ev.total_steps} ({ev.elapsed_s:.0f}s)", flush=True)
        elif ev.kind == "error":
            print(f"error: {ev.run_id}: {ev.message}", flush=True)

    results = run(cfg, on_event=show if main_process else None, out_dir=args.out if main_process else None)
    if main_process:
        for r in results["runs"]:
            s = r["summary"]
            print(f"{r['run_id']}: {s.get('status')}, final loss {s.get('final_loss')}, "
                  f"{s.get('metric')} {s.get('eval_metric')}")
    return 0 if all(r["status"] == "done" for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
