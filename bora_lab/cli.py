"""Command line: ``python -m bora_lab compare`` (side-by-side fine-tuning) and ``python -m bora_lab list``.

    python -m bora_lab compare                       # lora, dora, bora (rank 8) on fine_foods, MiniLM
    python -m bora_lab compare --task synthetic_col --methods lora,dora,dora_col,bora,full --ranks 4
    python -m bora_lab compare --task austen_lm --methods lora,bora --steps 10
    python -m bora_lab list                          # methods and tasks

Flags left out take the task's suggested values (``tasks.task_defaults``), then ``RunConfig``'s.
Bad input exits with status 2 and one line on stderr; a failed run (NaN loss, out of memory, bad
rank) exits with status 1 after the others finish; Ctrl-C cancels, saves what was computed and
exits with 130 (press it twice to abort at once).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from dataclasses import fields
from typing import Any

from .config import RunConfig

EXIT_OK, EXIT_RUN_FAILED, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise SystemExit(_fail(f"{message} (see --help)"))


def _fail(message: str) -> int:
    sys.stderr.write(f"error: {message}\n")
    return EXIT_BAD_INPUT


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_method_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["dora.detach_norm=false", "bora.eps=1e-8"]`` -> ``{"dora": {"detach_norm": False}, ...}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, val = item.partition("=")
        method, dot, name = key.partition(".")
        if not (sep and dot and method and name):
            raise ValueError(f"--method-option expects METHOD.OPTION=VALUE (e.g. dora.detach_norm=false), got {item!r}")
        out.setdefault(method.strip(), {})[name.strip()] = _value(val.strip())
    return out


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m bora_lab", description="BoRA Lab: compare PEFT methods side by side.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    c = sub.add_parser("compare", help="fine-tune several methods side by side and compare them")
    add = c.add_argument
    add("--task", help="fine_foods (default), austen_books, austen_lm, synthetic_row|col|rank|mix, glue/<name>, "
                       "or a Hugging Face dataset id")
    add("--model", help="minilm (default), smollm2, or a Hugging Face model id")
    add("--methods", type=_csv, help="comma-separated method names (default lora,dora,bora)")
    add("--ranks", type=_ints, help="comma-separated ranks (default 8)")
    add("--steps", type=int)
    add("--lr", type=float, help="peak learning rate")
    add("--alpha", type=float, help="LoRA scaling numerator (s = alpha / r)")
    add("--batch-size", type=int)
    add("--max-length", type=int, help="tokens per example")
    add("--seed", type=int)
    add("--eval-every", type=int)
    add("--eval-samples", type=int, help="test examples per evaluation (0 = all)")
    add("--analyze-every", type=int, help="steps between magnitude/direction snapshots")
    add("--warmup-ratio", type=float)
    add("--weight-decay", type=float)
    add("--grad-clip", type=float, help="max gradient norm (0 disables)")
    add("--train-samples", type=int, help="cap on training examples (0 = all)")
    add("--target-modules", type=_csv, help="comma-separated module names to adapt (default per architecture)")
    add("--analysis-module", help="module type to analyse (default: the attention query)")
    add("--layers", type=_ints, help="comma-separated layer indices to analyse (default all)")
    add("--device", choices=["auto", "cpu", "cuda", "mps"])
    add("--num-layers", type=int, help="keep only the first N transformer layers")
    add("--num-threads", type=int, help="torch CPU threads (default: auto, fewer when the CPU is busy)")
    add("--text-column")
    add("--label-column")
    add("--method-option", action="append", default=[], metavar="METHOD.OPTION=VALUE",
        help="method option, repeatable (e.g. dora.detach_norm=false)")
    add("--sequential", action="store_true", help="run one method after another instead of in lockstep")
    add("--export-weights", action="store_true", help="save merged analysed weights at start and end")
    add("--out", help="output folder (default $BORA_LAB_RUNS/<timestamp>, else runs/<timestamp>)")
    add("--no-html", action="store_true", help="skip figures.html")
    add("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("list", help="list the methods and tasks")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """RunConfig from the parsed flags: given flags, then the task's suggestions, then the defaults."""
    from .train.tasks import task_defaults

    names = {f.name for f in fields(RunConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    given["analysis_layers"] = args.layers
    if args.method_option:
        given["method_options"] = parse_method_options(args.method_option)
    if args.sequential:
        given["lockstep"] = False
    if args.export_weights:
        given["export_weights"] = True
    values = {**task_defaults(given.get("task", RunConfig.task)), **{k: v for k, v in given.items() if v is not None}}
    return RunConfig(**values)


class _ProgressBar:
    """``[#####.....] 120/450 steps  ETA 35s`` on stderr, redrawn at most 5 times a second."""

    def __init__(self, enabled: bool, width: int = 30):
        self.enabled, self.width, self.last, self.drawn = enabled, width, 0.0, False

    def update(self, done: int, total: int, eta: float, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.2 and not force and done < total):
            return
        self.last = now
        filled = int(self.width * done / max(total, 1))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} steps  ETA {eta:4.0f}s ")
        sys.stderr.flush()
        self.drawn = True

    def line(self, text: str) -> None:
        """Print a message on its own line without breaking the bar."""
        sys.stderr.write(("\n" if self.drawn else "") + text + "\n")
        sys.stderr.flush()
        self.drawn = False

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            self.drawn = False


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of ``plots.results_table`` rows."""
    if not rows:
        return "(no runs)"

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return str(v)
        if isinstance(v, int):
            return f"{v:,}"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cols = list(rows[0])
    text = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    fmt = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([fmt(cols), fmt(["-" * w for w in widths]), *(fmt(t) for t in text)])


def cmd_list() -> int:
    from . import methods
    from .train.tasks import TASKS

    print("methods:")
    for name in methods.available():
        i = methods.info(name)
        print(f"  {name:<12} {i['kind']:<6} axis: {i['magnitude_axis']:<28} {i['description']}")
    print("tasks:")
    for name, spec in TASKS.items():
        where = "online" if spec.online else "offline"
        print(f"  {name:<16} {spec.kind:<15} {where:<8} {spec.description}")
    print("  <dataset id>     any Hugging Face dataset with a text column (online; --text-column, --label-column)")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from .plots import results_table
    from .train.results import save_results
    from .train.trainer import compare, validate

    cfg = config_from_args(args)
    validate(cfg)
    # the same folder the app's History tab lists, so CLI runs show up there
    out = args.out or os.path.join(os.environ.get("BORA_LAB_RUNS", "runs"), time.strftime("%Y%m%d-%H%M%S"))
    cancel = threading.Event()

    def on_sigint(signum, frame):  # first Ctrl-C: cancel between steps; second: abort
        cancel.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, on_sigint)
    bar = _ProgressBar(enabled=not args.quiet)
    results, weights, layers, failed = {}, {}, None, []
    try:
        for ev in compare(cfg, cancel):
            if ev.kind == "progress":
                bar.update(ev.done_steps, ev.total_steps, ev.eta_s)
            elif ev.kind == "error":
                failed.append(ev.run_id)
                bar.line(f"error: {ev.run_id}: {ev.message}")
            elif ev.kind == "cancelled":
                bar.line(f"cancelled: {ev.message}")
            elif ev.kind == "comparison_done":
                results, weights, layers = ev.results, ev.weights, ev.layers
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    save_results(results, out, weights=weights, html=not args.no_html, layers=layers)
    print(format_table(results_table(results)))
    extra = f"; overheads: analysis {_overhead(results)}" if results.get("runs") else ""
    print(f"\n{results['status']} in {results.get('elapsed_s', 0):.0f}s on {results.get('device')} "
          f"({'lockstep' if results.get('lockstep') else 'sequential'}){extra}; saved to {out}")
    if cancel.is_set():
        return EXIT_CANCELLED
    return EXIT_RUN_FAILED if failed else EXIT_OK


def _overhead(results: dict) -> str:
    vals = [r["summary"].get("analysis_overhead_pct") for r in results["runs"] if r.get("summary")]
    vals = [v for v in vals if v is not None]
    return f"{max(vals):.1f}% of step time (max over runs)" if vals else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["compare", *(argv if argv is not None else sys.argv[1:])])
    try:
        return cmd_list() if args.command == "list" else cmd_compare(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as err:
        if os.environ.get("BORA_LAB_DEBUG"):
            raise
        return _fail((str(err).strip().splitlines() or [type(err).__name__])[0])
    except KeyboardInterrupt:
        sys.stderr.write("\naborted\n")
        return EXIT_CANCELLED
    except Exception as err:
        if os.environ.get("BORA_LAB_DEBUG"):
            raise
        sys.stderr.write(f"error: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}\n")
        return EXIT_RUN_FAILED
