"""The History tab: saved runs (the app's and the CLI's), reopened, overlaid and downloaded.

Every comparison is saved under ``$BORA_LAB_RUNS`` (default ``./runs``) in the CLI's format. A
visitor sees the runs of their own session; "every saved run" (CLI runs, other sessions) is on by
default on a personal machine and off on a Hugging Face Space (``SPACE_ID`` set), unless
``$BORA_LAB_SHARED_HISTORY`` is ``1`` or ``0``.
"""
from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr

from bora_lab.limits import limit, private_runs

from . import common, tab_try, visitor
from .compare_layout import md_view_radio
from .i18n import t

DOWNLOAD_SUFFIXES = (".json", ".csv", ".html")
LIST_COLUMNS = ["run folder", "saved", "model", "task", "runs", "steps", "state"]


def _load(folder: Path) -> dict[str, Any]:
    from bora_lab.record import load_results

    return load_results(folder)


def describe(folder: Path) -> dict[str, Any]:
    """One row of the run list: folder, date, model, task, runs, steps and state."""
    saved = time.localtime((folder / visitor.RESULTS_FILE).stat().st_mtime)
    row: dict[str, Any] = {"run folder": folder.name, "saved": time.strftime("%Y-%m-%d %H:%M", saved)}
    try:
        results = json.loads((folder / visitor.RESULTS_FILE).read_text())
        cfg = results.get("config", {})
        state = results.get("status", "?")
        if state == "running" and not visitor.is_active(folder):  # its process died or was stopped
            state = "interrupted"
        row.update({
            "model": str(cfg.get("model", "?")),
            "task": str(cfg.get("task", "?")),
            "runs": ", ".join(str(run.get("run_id", "?")) for run in results.get("runs", [])),
            "steps": str(cfg.get("steps", "?")),
            "state": str(state),
        })
    except Exception as err:  # noqa: BLE001 - one bad file must not hide the others' list
        return {**row, "state": f"unreadable: {common.error_message(err)}"}
    return row


def list_runs(session: visitor.Session, show_all: bool):
    """Refresh the run list and the choices of the "runs to open" dropdown."""
    import pandas as pd

    folders = visitor.run_folders(session, show_all)
    frame = pd.DataFrame([describe(f) for f in folders], columns=LIST_COLUMNS)
    choices = [f.name for f in folders]
    return frame, gr.update(choices=choices, value=choices[:1])


def short_label(folder_name: str) -> str:
    """``"20261123-000228-fine_foods-lora"`` -> ``"20261123-000228"`` (legend names stay short)."""
    match = re.match(r"\d{8}-\d{6}(?=-|$)", folder_name)
    return match.group(0) if match else folder_name


def merge_results(results: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """Overlay several comparisons in one results dict; run ids get `` (<label>)`` appended."""
    if len(results) == 1:
        return results[0]
    merged = copy.deepcopy(results[0])
    merged["runs"] = [{**run, "run_id": f"{run['run_id']} ({label})"} for res, label in zip(results, labels)
                      for run in copy.deepcopy(res.get("runs", []))]
    merged["overlay_of"] = list(labels)
    merged.pop("aggregate", None)  # recomputed from the overlaid runs (each comparison keeps its groups)
    return merged


def _bundle_dir(session: visitor.Session) -> Path:
    """A fresh temporary folder for this visitor's downloads; the previous one is removed."""
    session.close()  # removes the last bundle
    session.bundle_dir = Path(tempfile.mkdtemp(prefix="bora_lab_download_"))
    return session.bundle_dir


def downloads(session: visitor.Session, folders: list[Path], results: dict[str, Any]) -> list[str]:
    """Files to download, copied into a temporary bundle (the runs folder itself is never served):
    a run's own files (the HTML report added if missing), or for an overlay the merged files."""
    from bora_lab.figures import report_html
    from bora_lab.record import save_results

    out = _bundle_dir(session)
    if len(folders) == 1:
        for p in folders[0].iterdir():
            if p.suffix in DOWNLOAD_SUFFIXES and p.is_file() and not p.is_symlink():
                shutil.copyfile(p, out / p.name)
        if not (out / "figures.html").exists():
            (out / "figures.html").write_text(report_html(results), encoding="utf-8")
    else:
        save_results(results, out, figures_html=report_html(results))
    return sorted(str(p) for p in out.iterdir() if p.suffix in DOWNLOAD_SUFFIXES)


def _render(results: dict[str, Any], view_label: str) -> dict[str, Any]:
    try:
        return common.render_plots(results, common.PLOTS, common.MD_VIEWS.get(view_label, view_label))
    except Exception as err:  # noqa: BLE001 - a results file of the right shape but wrong types
        raise gr.Error(f"Could not draw this run: {common.error_message(err)}", print_exception=False) from None


def open_runs(session: visitor.Session, show_all: bool, names: list[str], view_label: str):
    """Open one saved run, or overlay several; returns status, plots, table and download files."""
    if not names:
        raise gr.Error("Pick at least one saved run to open.", print_exception=False)
    allowed = {f.name: f for f in visitor.run_folders(session, show_all)}
    folders = [allowed[n] for n in names if n in allowed]
    if len(folders) != len(names):
        raise gr.Error("That run is not in your list any more; press Refresh.", print_exception=False)
    try:
        labels = [short_label(f.name) for f in folders]
        if len(set(labels)) < len(labels):  # two runs saved in the same second
            labels = [f.name for f in folders]
        results = merge_results([_load(f) for f in folders], labels)
    except Exception as err:
        raise gr.Error(f"Could not open the run: {common.error_message(err)}", print_exception=False) from None
    plots = _render(results, view_label)
    session.history_results = results
    status = f"Showing {', '.join(f'`{n}`' for n in names)}."
    return (status, *(plots[n] for n in common.PLOTS), downloads(session, folders, results))


def open_upload(session: visitor.Session, path: str | None, view_label: str):
    """Open a ``results.json`` uploaded from disk (a CLI run made elsewhere)."""
    if not path:
        return tuple(gr.skip() for _ in range(len(common.PLOTS) + 2))
    upload = Path(path)
    try:
        most = limit("upload_mb")
        if upload.stat().st_size > most * 2**20:
            raise gr.Error(f"The upload is {upload.stat().st_size / 2**20:.1f} MB; at most {most} MB "
                           "(BORA_LAB_MAX_UPLOAD_MB).", print_exception=False)
        results = _load(upload)
    except gr.Error:
        raise
    except Exception as err:
        raise gr.Error(f"Not a BoRA Lab results.json: {common.error_message(err)}", print_exception=False) from None
    finally:
        upload.unlink(missing_ok=True)  # the server keeps no uploads
    plots = _render(results, view_label)
    session.history_results = results
    return (f"Showing the uploaded `{upload.name}`.", *(plots[n] for n in common.PLOTS), gr.skip())


def change_view(session: visitor.Session, view_label: str):
    results = getattr(session, "history_results", None)
    if results is None:
        return gr.skip()
    return common.render_plots(results, ("md",), common.MD_VIEWS.get(view_label, view_label))["md"]


def export_choices(session: visitor.Session, show_all: bool, names: list[str] | None):
    """``"folder|run id"`` choices of the runs with a saved adapter in the opened comparisons."""
    choices = []
    for name in names or []:
        try:
            folder = tab_try.folder_of(session, name, show_all)
        except gr.Error:  # still running, or gone
            continue
        saved = tab_try.run_choices(_load(folder))[1]
        choices += [(f"{rid} ({name})" if len(names) > 1 else rid, f"{name}|{rid}") for rid in saved]
    return gr.update(choices=choices, value=choices[0][1] if choices else None)


def export_picked(session: visitor.Session, show_all: bool, picked: str | None, fmt: str):
    """The export buttons: ``picked`` is one of :func:`export_choices`' values (checked again there)."""
    name, _, run_id = (picked or "").rpartition("|")
    return tab_try.export(session, name or None, run_id or None, fmt, show_all)


def build_tab(session: gr.State) -> tuple[list, list]:
    """Build the History tab's components and wiring.

    Returns:
        ``(inputs, outputs)`` of :func:`list_runs`, for the layout to refresh the list when the tab opens.
    """
    with gr.Row():
        show_all = gr.Checkbox(visitor.shared_history_default(), label=t("history.show_all"),
                               visible=not private_runs())  # private runs: nobody sees another's
        refresh = gr.Button(t("common.refresh"), size="sm", scale=0, elem_id="bl-history-refresh")
    listing = gr.Dataframe(label=t("history.saved"), interactive=False, elem_id="bl-history-list")
    with gr.Row():
        chosen = gr.Dropdown([], multiselect=True, label=t("history.pick"), info=t("history.pick.help"),
                             elem_id="bl-history-pick", scale=4)
        open_btn = gr.Button(t("history.open"), variant="primary", scale=1, min_width=120, elem_id="bl-history-open")
    with gr.Accordion(t("history.upload"), open=False):
        upload = gr.File(label="results.json", file_types=[".json"], height=140)
    status = gr.Markdown(elem_id="bl-history-status")
    empty = common.empty_plots()
    with gr.Row(equal_height=True):
        loss = gr.Plot(empty["loss"], label="Training loss", show_label=False)
        metric = gr.Plot(empty["metric"], label="Evaluation metric", show_label=False)
    view = md_view_radio()
    md = gr.Plot(empty["md"], label="Magnitude and direction changes", show_label=False)
    scatter = gr.Plot(empty["scatter"], label="DoRA figure 2", show_label=False)
    forest = gr.Plot(empty["forest"], label="Difference from the baseline", show_label=False)
    table = gr.Dataframe(empty["table"], label=t("compare.results"), interactive=False, wrap=False,
                         elem_id="bl-history-table")
    files = gr.File(label=t("history.downloads"), file_count="multiple", interactive=False)
    with gr.Accordion(t("history.export"), open=False):
        with gr.Row(equal_height=True):
            export_pick = gr.Dropdown([], label=t("common.run"), info=t("history.export.help"), scale=3,
                                      elem_id="bl-history-export-run")
            peft_btn = gr.Button(t("export.peft"), scale=1, elem_id="bl-history-export-peft")
            merged_btn = gr.Button(t("export.merged"), scale=1, elem_id="bl-history-export-merged")
        export_status = gr.Markdown(elem_id="bl-history-export-status")
        export_file = gr.File(label=t("export.file"), interactive=False, elem_id="bl-history-export-file")
    shown = [status, loss, metric, md, scatter, forest, table]
    for trigger in (refresh.click, show_all.change):
        trigger(list_runs, [session, show_all], [listing, chosen], concurrency_limit=None)
    open_btn.click(open_runs, [session, show_all, chosen, view], shown + [files], concurrency_limit=None).success(
        export_choices, [session, show_all, chosen], export_pick, concurrency_limit=None)
    for btn, fmt in ((peft_btn, "peft"), (merged_btn, "merged")):  # loads the run: Try it's queue, not training's
        btn.click(functools.partial(export_picked, fmt=fmt), [session, show_all, export_pick],
                  [export_status, export_file], concurrency_limit=tab_try.CONCURRENCY, concurrency_id="try_it")
    upload.upload(open_upload, [session, upload, view], shown + [files], concurrency_limit=None)
    view.change(change_view, [session, view], md, concurrency_limit=None, show_progress="hidden")
    return [session, show_all], [listing, chosen]
