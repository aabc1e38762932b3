"""Helpers every tab shares: results -> plots and table, progress bar, durations, error text."""
from __future__ import annotations

import functools
import math
import re
from typing import Any

# ---------------------------------------------------------------------------------------------
# Trainer events -> updates
# ---------------------------------------------------------------------------------------------
PLOTS = ("loss", "metric", "md", "scatter", "forest", "table")  # outputs drawn from the results dict
MD_VIEWS = {"from the start (t vs 0)": "from_start", "step to step (t vs t-1)": "step_to_step"}
# Which outputs an event makes stale (event ``kind`` -> plot names). A step does not redraw the
# table (Gradio's table payload is the costliest output); analysis snapshots and evals, which come
# every few steps, do.
_STALE: dict[str, set[str]] = {
    "run_started": {"table"},
    "step": {"loss"},
    "eval": {"metric", "table"},
    "analysis": {"md", "scatter", "table"},
    "run_finished": set(PLOTS),  # the forest plot needs finished runs
    "error": {"table"},
    "comparison_done": set(PLOTS),
}


def stale_plots(events) -> set[str]:
    """The plot outputs that ``events`` change (progress and cancel events change none)."""
    out: set[str] = set()
    for ev in events:
        out |= _STALE.get(ev.kind, set())
    return out


def table_frame(results: dict[str, Any]):
    """The results table as a ``pandas.DataFrame``: one row per run (only the headers before any run);
    with several seeds, one row per (method, rank): mean ± 95% half-width over seeds and the verdict
    against the baseline."""
    import pandas as pd

    from bora_lab.record.aggregate import aggregate_rows, has_repeats
    from bora_lab.record.tables import results_table

    if has_repeats(results):
        return pd.DataFrame(aggregate_rows(results))
    rows = results_table(results)
    if rows:
        return pd.DataFrame(rows)
    from bora_lab.record import new_run_entry

    headers = results_table({**results, "runs": [new_run_entry("lora-r8", "lora", 8)]})[0]
    return pd.DataFrame(columns=list(headers))


@functools.lru_cache(maxsize=1)
def empty_plots() -> dict[str, Any]:
    """What the plots and the table show before any data (titles, "no data yet"); built once, never
    mutated (Gradio only serialises them), so every visitor can share them."""
    return render_plots({"runs": [], "task": {}}, PLOTS)


def render_plots(results: dict[str, Any], names, md_view: str = "from_start") -> dict[str, Any]:
    """Build the figures/table named in ``names`` from a results dict (same structure as results.json).

    Args:
        results: the accumulated results (``ResultsAccumulator``) or a loaded ``results.json``.
        names: subset of :data:`PLOTS` to build.
        md_view: ``"from_start"`` or ``"step_to_step"`` for the magnitude/direction small multiples.

    Returns:
        ``{name: plotly Figure or DataFrame}`` for each requested name.
    """
    from bora_lab.figures import runs as figures
    from bora_lab.figures import seeds

    banded = seeds.has_seeds(results)
    builders = {
        "loss": lambda: seeds.loss_band_figure(results) if banded else figures.loss_figure(results),
        "metric": lambda: seeds.metric_band_figure(results) if banded else figures.metric_figure(results),
        "forest": lambda: seeds.forest_figure(results),
        "md": lambda: figures.md_figure(results, view=md_view),
        "scatter": lambda: figures.dora_scatter_figure(results),
        "table": lambda: table_frame(results),
    }
    return {name: builders[name]() for name in PLOTS if name in names}


PROJECTOR_FONT = 16  # presenter mode (?present=1): figure text in px (12 otherwise), titles 2 px more
PROJECTOR_SCALE = 1.35  # ... and figure heights, times the normal ones


def for_projector(plots: dict[str, Any]) -> dict[str, Any]:
    """Presenter mode: copies of the figures in ``plots`` with larger text and height (tables as they are)."""
    import plotly.graph_objects as go

    out = {}
    for name, fig in plots.items():
        if isinstance(fig, go.Figure):
            fig = go.Figure(fig)  # never change a shared figure (empty_plots is cached)
            fig.update_layout(font={"size": PROJECTOR_FONT}, title_font_size=PROJECTOR_FONT + 2,
                              height=round((fig.layout.height or 450) * PROJECTOR_SCALE))
        out[name] = fig
    return out


def fmt_duration(seconds: float | None) -> str:
    """``75.2 -> "1:15"``, ``3725 -> "1:02:05"``; ``"?"`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_html(done: int, total: int, elapsed_s: float = 0.0, eta_s: float | None = None,
                  state: str = "running") -> str:
    """A progress bar with steps, elapsed time and ETA (``state``: running, done, stopped, error)."""
    frac = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
    label = {"running": f"about {fmt_duration(eta_s)} left", "done": "finished",
             "stopped": "stopped", "error": "stopped by an error", "idle": "ready"}.get(state, state)
    return (
        f'<div class="bl-progress" data-state="{state}" role="progressbar" aria-valuenow="{done}" '
        f'aria-valuemax="{total}"><div class="bl-progress-bar" style="width:{100 * frac:.1f}%"></div></div>'
        f'<div class="bl-progress-text">{done} / {total} steps ({100 * frac:.0f}%) · '
        f"{fmt_duration(elapsed_s)} elapsed · {label}</div>"
    )


_SERVER_PATH = re.compile(r"(^|[\s'\"(=])(?:/[^\s'\"/)]+)+/([^\s'\")/]+)")  # /a/b/c -> .../c


def error_message(err: BaseException, device: str = "") -> str:
    """One line for people from any exception the trainer raises (never a traceback)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = _SERVER_PATH.sub(lambda m: m.group(1) + ".../" + m.group(2), text)  # no server paths on the page
    if type(err).__name__ == "OutOfMemoryError" or "out of memory" in text.lower():
        where = f" on {device}" if device else ""
        return (f"Out of memory{where}: try a smaller batch size, a smaller rank, fewer layers "
                "(advanced settings) or fewer methods at once.")
    if isinstance(err, (ValueError, KeyError, FileNotFoundError, LookupError, TypeError)):
        return (text[:1].upper() + text[1:])[:400]
    return f"{type(err).__name__}: {text}"[:400]


