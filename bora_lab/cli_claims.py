"""``bora-lab reproduce``: run a paper claim's experiment and print our value next to the paper's.

    bora-lab reproduce --list                         # the claims, with their last recorded verdicts
    bora-lab reproduce bora-param-percent             # seconds: exact counts on Llama-2-7B's shapes
    bora-lab reproduce bora-asymmetry --seeds 0,1,2,3,4   # more seeds, narrower intervals
    bora-lab reproduce dora-slopes --set steps=600 --set num_layers=2 --out runs/slopes
    bora-lab reproduce bora-asymmetry --save          # also write the repo's record (the app shows it)
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .cli_output import Progress
from .teach.claims.text import format_value


def add_reproduce_parser(sub: Any) -> None:
    """The ``reproduce`` subcommand, on the parser's subparsers ``sub``."""
    r = sub.add_parser("reproduce", help="check a claim of the source papers on the offline models",
                       description="Run a paper claim's experiment (catalogue: bora_lab/teach/claims/catalogue) "
                       "and print our value with its 95% interval next to the paper's, and a verdict.")
    r.add_argument("claim", nargs="?", metavar="CLAIM", help="a claim id (see --list)")
    r.add_argument("--list", action="store_true", help="list the claims and their recorded verdicts")
    r.add_argument("--markdown", action="store_true", help="with --list: every record as Markdown tables")
    r.add_argument("--seeds", type=_seeds, help="seeds instead of the claim's, e.g. 0,1,2,3,4 (training claims)")
    r.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change one comparison setting (a RunConfig field, JSON value), repeatable, e.g. steps=300")
    r.add_argument("--out", metavar="DIR", help="keep the experiment's run folder there (training claims)")
    r.add_argument("--save", action="store_true", help="write the result as the claim's record in the package")
    r.add_argument("--json", action="store_true", help="print the record as JSON")
    r.add_argument("--quiet", action="store_true", help="no progress output")


def _seeds(text: str) -> list[int]:
    try:
        seeds = list(dict.fromkeys(int(t) for t in text.split(",") if t.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not 1 <= len(seeds) <= 20 or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"between 1 and 20 seeds, none negative, got {text!r}")
    return seeds


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["steps=300", "methods=[\\"lora\\"]"]`` -> ``{"steps": 300, "methods": ["lora"]}`` (JSON values,
    else plain strings). Raises ValueError on an item without ``=`` or an unknown field."""
    from .config import RunConfig

    out = {}
    for item in items:
        name, eq, text = item.partition("=")
        name = name.strip()
        if not eq or not name:
            raise ValueError(f"--set takes FIELD=VALUE, got {item!r}")
        if name not in RunConfig.__dataclass_fields__:
            raise ValueError(f"--set {name}: not a comparison setting (see `bora-lab compare --help`)")
        is_list = str(RunConfig.__dataclass_fields__[name].type).startswith("list")
        if is_list and not text.strip().startswith("["):  # methods=full,lora,dora  ranks=4,8
            out[name] = [_value(part) for part in text.split(",") if part.strip()]
        else:
            out[name] = _value(text)
    return out


def _value(text: str) -> Any:
    """A number, true/false/null or a JSON list as such; anything else as the text."""
    try:
        return json.loads(text.strip())
    except json.JSONDecodeError:
        return text.strip()


def format_record(rec: dict[str, Any]) -> str:
    """The record as text: title, citation, one line per row, the verdict, the budget."""
    lines = [f"{rec['title']}", f"  {rec['cite']}"]
    width = max((len(r["label"]) for r in rec["rows"]), default=10)
    for r in rec["rows"]:
        paper = r["paper"] if isinstance(r["paper"], str) else f"{r['paper']:g}"
        lines.append(f"  {r['label']:<{width}}  paper {paper:<22} ours {format_value(r['ours'], r['unit']):<34} {r['verdict']}")
    lines += [f"  verdict: {rec['verdict']}", f"  {rec['explanation']}", f"  budget: {rec['budget']}"]
    return "\n".join(lines)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .teach import claims

    if args.list and args.markdown:
        from .teach.claims.text import records_markdown

        print(records_markdown([(c, claims.record_of(c["id"])) for c in claims.catalogue()]), end="")
        return 0
    if args.list or not args.claim:
        for c in claims.catalogue():
            rec = claims.record_of(c["id"])
            state = "no record" if not rec else rec["verdict"] + (" (out of date)" if rec.get("stale") else "")
            print(f"{c['id']:<22} {c['experiment']['kind']:<17} {state:<30} {c['title']}")
        return 0
    claim = claims.get_claim(args.claim)
    bar = Progress(enabled=not args.quiet and claim["experiment"]["kind"] in claims.TRAINING)

    def on_event(ev: Any) -> None:
        if getattr(ev, "kind", "") == "progress":
            bar.update(ev.done_steps, ev.total_steps, ev.eta_s)

    try:
        rec = claims.reproduce(args.claim, seeds=args.seeds, overrides=parse_sets(args.set),
                               on_event=on_event, out_dir=args.out)
    finally:
        bar.close()
    print(json.dumps(rec, indent=1, ensure_ascii=False) if args.json else format_record(rec))
    if args.save:
        sys.stderr.write(f"saved {claims.save_record(rec)}\n")
    return 0
