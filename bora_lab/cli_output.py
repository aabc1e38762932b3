"""What ``bora-lab compare`` prints: the progress (a tqdm bar on a terminal, plain lines in a log) and the
results table."""
from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """Progress on stderr: a tqdm bar on a terminal; in a log (stderr not a terminal) one plain line at
    the first step, then every 10% of the steps or every 30 s, and at the end, never ``\\r`` frames."""

    def __init__(self, enabled: bool, stream: Any = None):
        self.stream = stream or sys.stderr
        self.enabled, self.bar, self.last_t, self.last_pct = enabled, None, 0.0, -1
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, done: int, total: int, eta: float) -> None:
        if not self.enabled:
            return
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", file=self.stream, dynamic_ncols=True)
            self.bar.total = total
            self.bar.update(done - self.bar.n)
            return
        now, pct = time.monotonic(), int(10 * done / max(total, 1))
        if self.last_pct < 0 or pct > self.last_pct or now - self.last_t >= 30 or done >= total:
            self.last_t, self.last_pct = now, pct
            self.stream.write(f"{done}/{total} steps ({100 * done / max(total, 1):.0f}%), ETA {eta:.0f}s\n")
            self.stream.flush()

    def line(self, text: str) -> None:
        """A message on its own line, without breaking the bar."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of ``record.results_table`` rows."""
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


def threads_text(results: dict) -> str:
    """``"2 CPU threads (auto: ...)"``, or the device's note on a GPU."""
    n, why = results.get("num_threads"), results.get("threads_reason") or ""
    return f"{n} CPU thread{'s' if n != 1 else ''} ({why})" if n else why


def overhead(results: dict) -> str:
    vals = [r["summary"].get("analysis_overhead_pct") for r in results["runs"] if r.get("summary")]
    vals = [v for v in vals if v is not None]
    return f"{max(vals):.1f}% of step time (max over runs)" if vals else "n/a"


def verdict_lines(results: dict) -> str:
    """Every method against the baseline, in words (and the per-seed table when there are several seeds)."""
    from .record.aggregate import aggregate_rows, has_repeats, headline

    agg = headline(results)
    lines = []
    if has_repeats(results):
        seeds = len(agg.get("seeds") or [None])
        tuned = ", each method at its chosen learning rate" if "aggregate_tuned" in results else ""
        lines += ["", f"Over {seeds} seed{'s' * (seeds > 1)}{tuned} (mean ± 95% half-width):",
                  format_table(aggregate_rows(results))]
    verdicts = [(g["key"], g["verdict"], g["vs_baseline"]) for g in agg.get("groups", []) if g.get("verdict")]
    if verdicts:
        how = verdicts[0][2]["method"]
        lines += ["", f"Against {agg['baseline']} on the final evaluation (95% interval; {how}):"]
        lines += [f"  {key}: {text}" for key, text, _ in verdicts]
    return "\n".join(lines)
