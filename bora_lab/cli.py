"""Command line: ``bora-lab`` (or ``python -m bora_lab``): ``compare``, ``list``, ``app``.

    bora-lab compare                       # lora, dora, bora (rank 8) on fine_foods, MiniLM
    bora-lab compare --task synthetic_col --methods lora,dora,dora_col,bora,full --ranks 4
    bora-lab compare --task austen_lm --methods lora,bora --steps 10
    bora-lab compare --config runs/<run>/config.json --seed 1   # a saved configuration, one flag changed
    bora-lab list                          # methods and tasks
    bora-lab predict runs/<run> --run dora-r8 "Great coffee, would buy again"   # a trained run, on text
    bora-lab export runs/<run> --run bora-r8 --format merged --out merged/   # a plain transformers model
    bora-lab reproduce bora-asymmetry      # a claim of the papers, checked with seeds (--list: all)
    bora-lab app                           # the Gradio app

The ``compare`` flags are generated from ``RunConfig``'s fields. Flags left out take the ``--config``
file's values, then the task's suggested values (``tasks.task_defaults``), then ``RunConfig``'s.
Bad input exits with status 2 and one line on stderr; a failed run (NaN loss, out of memory, bad
rank, a diverging loss) exits with status 1 after the others finish; Ctrl-C or SIGTERM cancels at the
next step, saves what was computed and exits with 130; a second one stops at once and still saves
(status "interrupted"). The folder is also flushed every 20 s, so even a crash leaves a partial run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import sys
import threading
import time
from typing import Any

from .cli_claims import add_reproduce_parser, cmd_reproduce
from .cli_runs import add_run_parsers, cmd_export, cmd_predict
from .cli_output import Progress, format_table, overhead, threads_text, verdict_lines
from .config import RunConfig, default_of, lr_choice, settings

EXIT_OK, EXIT_RUN_FAILED, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 130
CHECKPOINT_S = 20.0  # flush a running comparison to its folder this often


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise SystemExit(_fail(f"{message} (see --help)"))


def _fail(message: str) -> int:
    sys.stderr.write(f"error: {message}\n")
    return EXIT_BAD_INPUT


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _numbers(cast: type, what: str):
    def parse(text: str) -> list:
        try:
            return [cast(t) for t in _csv(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
    return parse


_ints, _floats = _numbers(int, "integers"), _numbers(float, "numbers")


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


def _flag(f) -> str:
    flag = f.metadata.get("flag")
    return flag if flag is not None else "--" + f.name.replace("_", "-")


def _arg_type(f) -> Any:
    kind = str(f.type)
    if kind.startswith("list[int]"):
        return _ints
    if kind.startswith("list[float]"):
        return _floats
    if kind.startswith("list[str]"):
        return _csv
    if kind.startswith("int"):
        return int
    if kind.startswith("float"):
        return float
    return str


def _task_suggestions(name: str) -> str:
    """``"; tasks suggest: synthetic_*: 600, austen_lm: 20"`` for the tasks that change ``name``."""
    from .engine.tasks import TASKS

    by_value: dict[str, list[str]] = {}
    for task, spec in TASKS.items():
        if name in spec.defaults:
            by_value.setdefault(repr(spec.defaults[name]), []).append(task)
    parts = []
    for value, tasks in by_value.items():
        by_head: dict[str, list[str]] = {}
        for t in tasks:  # "synthetic_row", "synthetic_col"... -> "synthetic_*"
            by_head.setdefault(re.match(r"[a-z0-9]+[_/]?", t).group(0), []).append(t)
        label = ", ".join(f"{h}*" if len(ts) > 2 else ", ".join(ts) for h, ts in by_head.items())
        parts.append(f"{label}: {value.strip(chr(39))}")
    return f"; tasks suggest {'; '.join(parts)}" if parts else ""


def _default_text(f) -> str:
    value = default_of(f)
    if isinstance(value, list):
        value = ",".join(map(str, value))
    shown = "none" if value is None or value == "" else value
    return f"(default: {shown}{_task_suggestions(f.name)})"


def build_parser() -> argparse.ArgumentParser:
    """The ``compare`` flags are generated from ``RunConfig``'s fields (one description per setting)."""
    from . import __version__

    p = _Parser(prog="bora-lab", description="BoRA Lab: compare parameter-efficient fine-tuning methods side by "
                "side. `bora-lab COMMAND --help` describes each command.")
    p.add_argument("--version", action="version", version=f"bora-lab {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    c = sub.add_parser("compare", help="fine-tune several methods side by side and compare them",
                       description="Fine-tune several methods side by side on the same data and seed. Flags left "
                       "out take the --config file's values, then the task's suggestions, then the defaults shown.")
    c.add_argument("--config", metavar="FILE", help="a saved configuration: a run's config.json or a lesson's "
                   "JSON (its \"settings\"); flags given override it")
    for f in settings():
        flag = _flag(f)
        if not flag:
            continue
        meta = f.metadata
        text = f"{meta.get('cli_help') or meta['help']} {_default_text(f)}"
        kw: dict[str, Any] = {"dest": f.name, "help": text.replace("%", "%%")}
        if meta.get("choices"):
            kw["choices"] = list(meta["choices"])
        else:
            kw["type"] = _arg_type(f)
        c.add_argument(flag, **kw)
    add = c.add_argument
    add("--method-option", action="append", default=[], metavar="METHOD.OPTION=VALUE",
        help="method option, repeatable (e.g. dora.detach_norm=false); `bora-lab list` names the methods")
    add("--sequential", action="store_true", help="run one method after another instead of in lockstep "
        "(same numbers, less memory)")
    add("--export-weights", action="store_true", help="save the merged analysed weights at the start and the end")
    add("--grad-checkpointing", action="store_true", help="recompute activations in backward: less memory, slower")
    add("--lr-auto", action="store_true", default=None, help="sweep each method's suggested learning rate /3, x1, x3 and report "
        "each method at its best rate on the validation split (needs --val-samples)")
    add("--shared-lr", action="store_true", help="every method at --lr (default on MiniLM + fine_foods: each "
        "method at its suggested rate, docs/measured/learning_rates.md; giving --lr also does this)")
    add("--out", help="output folder (default: $BORA_LAB_RUNS/<time>-<random>, else runs/<time>-<random>)")
    add("--no-html", action="store_true", help="skip figures.html")
    add("--quiet", action="store_true", help="no progress output")
    sub.add_parser("list", help="list the methods and tasks", description="List the methods and tasks.")
    add_run_parsers(sub)
    add_reproduce_parser(sub)
    app = sub.add_parser("app", help="open the app (same as `python app.py`)",
                         description="Serve the Gradio app on http://127.0.0.1:7860 "
                         "(GRADIO_SERVER_NAME, GRADIO_SERVER_PORT change it).")
    app.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    return p


def read_config_file(path: str) -> dict[str, Any]:
    """The settings in ``path``: a run's ``config.json``, or a lesson (its ``settings``).

    Raises:
        ValueError: unreadable, not JSON, or not an object; unknown keys are named.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as err:
        raise ValueError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:
        raise ValueError(f"--config {path}: not valid JSON ({err})") from None
    if isinstance(data, dict) and isinstance(data.get("settings"), dict):
        data = data["settings"]  # a lesson
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a JSON object of settings, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in settings()})
    if unknown:
        raise ValueError(f"--config {path}: unknown setting(s) {', '.join(unknown)}")
    return data


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """RunConfig from the parsed flags: given flags, then the --config file, then the task's suggestions,
    then the defaults."""
    from .engine.tasks import task_defaults

    names = {f.name for f in settings()}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.method_option:
        given["method_options"] = parse_method_options(args.method_option)
    if args.sequential:
        given["lockstep"] = False
    if args.export_weights:
        given["export_weights"] = True
    if args.grad_checkpointing:
        given["grad_checkpointing"] = True
    if args.lr_auto:
        given["lr_auto"] = True
    if args.shared_lr:
        given["per_method_lr"] = False
    saved = read_config_file(args.config) if getattr(args, "config", None) else {}
    chosen = lr_choice({**saved, **given}, given)
    return RunConfig(**{**task_defaults(chosen.get("task", RunConfig.task)), **chosen})


def cmd_list(args: argparse.Namespace | None = None) -> int:
    from . import methods
    from .engine.tasks import TASKS

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
    from .engine.trainer import compare, validate
    from .figures import report_html
    from .record import ResultsAccumulator, results_table, save_results

    cfg = config_from_args(args)
    validate(cfg)
    leader = int(os.environ.get("RANK", "0") or 0) == 0  # under torchrun / accelerate launch only rank 0 writes
    args.quiet = args.quiet or not leader
    if not args.quiet:
        from .engine.estimate import cost_text

        print(f"cost: {cost_text(cfg, cfg.device)}", flush=True)
    # the same folder the app's History tab lists, so CLI runs show up there
    out = args.out or default_out_dir()
    cancel = threading.Event()

    def on_signal(signum, frame):  # first Ctrl-C or SIGTERM: cancel between steps; second: stop now
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    bar = Progress(enabled=not args.quiet)
    acc, weights, failed, last_flush = ResultsAccumulator(cfg), {}, [], time.monotonic()
    try:
        for ev in compare(cfg, cancel):
            acc.update(ev)
            if ev.kind == "comparison_started" and not args.quiet:
                runs = len(acc.results["runs"])
                bar.line(f"training {runs} run(s) on {ev.device}: {threads_text(acc.results)}")
                for row in (ev.matched or {}).get("table", []):
                    bar.line(f"  matched to {ev.matched['reference']}-r{row['reference_rank']} "
                             f"({row['reference_params']:,} params): {row['method']}-r{row['rank']} ({row['params']:,})")
            elif ev.kind == "progress":
                bar.update(ev.done_steps, ev.total_steps, ev.eta_s)
                if leader and time.monotonic() - last_flush >= CHECKPOINT_S:  # a crash leaves a readable partial run
                    save_results(acc.results, out, layers=acc.layers)
                    last_flush = time.monotonic()
            elif ev.kind == "error":
                failed.append(ev.run_id)
                bar.line(f"error: {ev.run_id}: {ev.message}")
            elif ev.kind == "cancelled":
                bar.line(f"cancelled: {ev.message}")
            elif ev.kind == "comparison_done":
                weights = ev.weights
    except KeyboardInterrupt:  # the second signal: stop at once, but keep what was computed
        acc.results["status"], acc.results["message"] = "interrupted", "stopped by a second Ctrl-C or SIGTERM"
        bar.line("interrupted: saving the steps so far")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        bar.close()
    results = acc.results
    if not leader:
        return EXIT_CANCELLED if cancel.is_set() else EXIT_RUN_FAILED if failed else EXIT_OK
    save_results(results, out, weights=weights, layers=acc.layers, adapters=acc.adapters,
                 figures_html=None if args.no_html else report_html(results))
    print(format_table(results_table(results)))
    print(verdict_lines(results))
    extra = f"; overheads: analysis {overhead(results)}" if results.get("runs") else ""
    print(f"\n{results['status']} in {results.get('elapsed_s') or 0:.0f}s on {results.get('device')}, "
          f"{threads_text(results)} ({'lockstep' if results.get('lockstep') else 'sequential'}){extra}; "
          f"saved to {out}")
    if cancel.is_set():
        return EXIT_CANCELLED
    return EXIT_RUN_FAILED if failed else EXIT_OK


def default_out_dir() -> str:
    """``$BORA_LAB_RUNS/<time>-<random>`` (else ``runs/...``): the app's History lists the same folder,
    and two runs started in the same second get different folders."""
    return os.path.join(os.environ.get("BORA_LAB_RUNS", "runs"),
                        f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}")


def cmd_app(args: argparse.Namespace) -> int:
    from .ui.app import build_demo, launch

    launch(build_demo(), share=args.share)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `bora-lab`: say what there is, start nothing
        parser.print_help()
        return EXIT_OK
    try:
        return {"list": cmd_list, "app": cmd_app, "compare": cmd_compare, "predict": cmd_predict,
                "export": cmd_export, "reproduce": cmd_reproduce}[args.command](args)
    except BrokenPipeError:  # `bora-lab list | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
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
