"""Record the built-in lessons: train each lesson's settings once and write its replayable recording.

Each lesson in ``bora_lab/teach/lessons/*.json`` is trained with exactly its settings
(``lesson_config(lesson)``) and written to ``bora_lab/teach/lessons/recordings/<lesson id>.json.gz``
(format: :mod:`bora_lab.teach.recordings`). Run it again whenever a lesson's settings change:
the app marks a recording whose settings hash no longer matches as stale.

Usage (from the repository root)::

    python scripts/record_lessons.py                       # every built-in lesson
    python scripts/record_lessons.py mora-high-rank        # only these lessons
    python scripts/record_lessons.py --missing             # only lessons without a current recording
    python scripts/record_lessons.py --list                # what is recorded, current or stale; no training
    python scripts/record_lessons.py --out /tmp/rec        # write elsewhere
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bora_lab.teach import lessons as L
from bora_lab.teach import recordings as R


def _status(lesson: dict, out: Path | None) -> tuple[str, int]:
    """``("missing" | "current" | "stale: ...", bytes)`` of a lesson's recording."""
    path = R.recording_path(lesson["id"], out)
    try:
        rec = R.load_recording(lesson, out)
    except R.RecordingError as err:
        return f"damaged: {err}", path.stat().st_size
    if rec is None:
        return "missing", 0
    return ("stale: " + "; ".join(rec["stale_reasons"])) if rec["stale"] else "current", path.stat().st_size


def _progress(lesson_id: str):
    """An ``on_event`` that prints a line about every 10% of the steps."""
    shown = [-1]

    def on_event(ev) -> None:
        if getattr(ev, "kind", None) == "progress" and ev.total_steps:
            tenth = 10 * ev.done_steps // ev.total_steps
            if tenth != shown[0]:
                shown[0] = tenth
                print(f"  {lesson_id}: step {ev.done_steps}/{ev.total_steps}, {ev.elapsed_s:.0f} s, "
                      f"about {ev.eta_s:.0f} s left", flush=True)
    return on_event


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lessons", nargs="*", metavar="LESSON_ID", help="lesson ids (default: every built-in lesson)")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {R.RECORDING_DIR})")
    parser.add_argument("--missing", action="store_true", help="only lessons whose recording is missing or stale")
    parser.add_argument("--list", action="store_true", help="print each lesson's recording status and exit")
    args = parser.parse_args(argv)

    builtin = {les["id"]: les for les in L.builtin_lessons()}
    unknown = [i for i in args.lessons if i not in builtin]
    if unknown:
        parser.error(f"unknown lesson id(s): {', '.join(unknown)}; built-in: {', '.join(builtin)}")
    chosen = [builtin[i] for i in args.lessons] if args.lessons else list(builtin.values())

    if args.list:
        for les in chosen:
            status, size = _status(les, args.out)
            print(f"{les['id']:24} {les['view']:8} {size / 1024:8.0f} KB  {status}")
        return 0

    failed = []
    for les in chosen:
        if args.missing and _status(les, args.out)[0] == "current":
            print(f"{les['id']}: current, skipped")
            continue
        print(f"{les['id']}: training ({les['view']} view)...", flush=True)
        t0 = time.perf_counter()
        try:
            path = R.record(les, args.out, on_event=_progress(les["id"]))
        except R.RecordingError as err:
            print(f"{les['id']}: FAILED: {err}", file=sys.stderr)
            failed.append(les["id"])
            continue
        rec = R.read_recording(path)
        runs = ", ".join(f"{r['run_id']} {r['status']}" for r in rec["results"]["runs"])
        dtypes = sorted({a["dtype"] for a in rec["arrays"].values()})
        kept = {rid: [c["step"] for c in part["checkpoints"]] for rid, part in rec["layers"].items()}
        print(f"{les['id']}: {path} ({path.stat().st_size / 1024:.0f} KB, {time.perf_counter() - t0:.0f} s; "
              f"runs: {runs}" + (f"; matrices {'/'.join(dtypes)} at steps {kept}" if kept else "") + ")")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
