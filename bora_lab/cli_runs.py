"""``bora-lab predict`` and ``bora-lab export``: use a trained run of a saved comparison.

    bora-lab predict runs/<run> --run dora-r8 "Great coffee, would buy again"
    bora-lab predict runs/<run> --run dora-r8 --checkpoint best "Stale and bitter"   # the best validation step
    bora-lab export runs/<run> --run bora-r8 --format merged --out merged/
    bora-lab export runs/<run> --run lora-r8 --format peft --out adapter/   # PeftModel.from_pretrained
"""
from __future__ import annotations

import argparse
import json
from typing import Any

EXIT_OK = 0
CHECKPOINT_HELP = ("final: the model at the end of training (default); best: at the best evaluation on the "
                   "validation split (comparisons with --val-samples)")


def add_run_parsers(sub: Any) -> None:
    """The ``predict`` and ``export`` subcommands, on the parser's subparsers ``sub``."""
    pr = sub.add_parser("predict", help="what a trained run says about some text",
                        description="Rebuild a run of a saved comparison (its adapters/ folder) and classify, "
                        "score or continue each TEXT.")
    pr.add_argument("run_dir", metavar="RUN_DIR", help="a comparison's folder (what `compare --out` wrote)")
    pr.add_argument("texts", metavar="TEXT", nargs="+", help="one or more texts")
    pr.add_argument("--run", required=True, metavar="ID", help="the run id, e.g. dora-r8 (see results.json)")
    pr.add_argument("--max-new-tokens", type=int, default=30, help="causal LM: tokens to generate (default: 30)")
    pr.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ex = sub.add_parser("export", help="save a trained run as a PEFT adapter or a plain merged model",
                        description="Rebuild a run of a saved comparison and save it as a PEFT adapter (every "
                        "method PEFT can load, some after an exact conversion) or as a merged transformers model "
                        "(every mergeable method), loadable without BoRA Lab; docs/export.md lists which is which.")
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a comparison's folder (what `compare --out` wrote)")
    ex.add_argument("--run", required=True, metavar="ID", help="the run id, e.g. bora-r8 (see results.json)")
    ex.add_argument("--format", choices=["merged", "peft"], default="merged",
                    help="merged: save_pretrained of the merged model (default); peft: PeftModel.from_pretrained")
    ex.add_argument("--out", required=True, metavar="DIR", help="output folder")
    for command in (pr, ex):
        command.add_argument("--checkpoint", choices=["final", "best"], default="final", help=CHECKPOINT_HELP)


def cmd_predict(args: argparse.Namespace) -> int:
    from .engine.reload import load_run, predict

    if not 1 <= args.max_new_tokens <= 1024:
        raise ValueError(f"--max-new-tokens must be between 1 and 1024, got {args.max_new_tokens}")
    out = predict(load_run(args.run_dir, args.run, which=args.checkpoint), args.texts, args.max_new_tokens)
    if args.json:
        print(json.dumps(out, indent=1))
        return EXIT_OK
    for row in out:
        if "probabilities" in row:
            probs = ", ".join(f"{k} {v:.3f}" for k, v in row["probabilities"].items())
            print(f"{row['label']:<10} ({probs})  {row['text']}")
        elif "value" in row:
            print(f"{row['value']:<10.4g} {row['text']}")
        else:
            print(f"{row['text']} -> {row['continuation']}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from .engine.reload import export_merged, export_peft, load_run

    run = load_run(args.run_dir, args.run, which=args.checkpoint)
    out = (export_peft if args.format == "peft" else export_merged)(run, args.out)
    print(f"saved {args.run} ({run.adapter_config.get('method')}) as {args.format} to {out}")
    return EXIT_OK
