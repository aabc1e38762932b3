"""The "Try it" tab: type a text, see what each trained run of a comparison makes of it.

Pick a finished comparison (this visit's, or a saved one) and up to ``MAX_RUNS`` of its runs. Each is
rebuilt from its saved adapter (``engine.reload.load_run``) and kept loaded for this visitor (LRU), so a
second text answers at once. Classification shows each run's class probabilities next to the untuned
base with its fresh head (a chance-level reference); causal LMs stream each run's continuation
(``engine.generate``). Below: the test examples the runs disagree on (``record.disagree``) and exports
(PEFT adapter or merged model, zipped; History's export buttons use the same handler). Run folders come
only from the visitor's own list (``visitor.run_folders``), never from a path sent by the page. These
events have their own queue (``concurrency_id="try_it"``), so they never wait behind a training.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from . import common, visitor
from .i18n import t

MAX_RUNS = 6  # runs side by side, and runs kept loaded per visitor (least recently used go first)
MAX_CHARS = 2000  # the longest text accepted
MAX_NEW_TOKENS = 200  # engine.generate.MAX_NEW_TOKENS (not imported: that module loads torch)
CONCURRENCY = 2  # Try-it events (loading, predicting, exporting) running at once, across visitors
SLOTS = MAX_RUNS + 1  # one output per run, plus the base model
STREAM_EVERY_S = 0.15  # the page is updated at most this often while continuations stream
AT = {"final evaluation": "final", "best checkpoint (on the validation split)": "best"}
BASE_CLS = "base · untrained head"  # the pretrained model with the fresh head the runs started from
BASE_LM = "base model (not fine-tuned)"
FORMATS = {"peft": "PEFT adapter", "merged": "merged model"}
_STATE_LOCK = threading.Lock()


class TryState:
    """What the tab keeps per visitor: loaded runs (LRU), evaluation texts per comparison, the last export."""
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: OrderedDict[tuple[str, str], Any] = OrderedDict()  # (folder, run id) -> LoadedRun
        self.examples: dict[str, list[dict[str, Any]]] = {}  # folder -> record.disagree.eval_examples
        self.export_dir: Path | None = None

    def drop_export(self) -> None:
        if self.export_dir is not None:
            shutil.rmtree(self.export_dir, ignore_errors=True)
            self.export_dir = None


def state_of(session: visitor.Session) -> TryState:
    """The visitor's :class:`TryState` (made on first use; its export files go with the session)."""
    with _STATE_LOCK:
        st = getattr(session, "try_it", None)
        if st is None:
            st = session.try_it = TryState()
            weakref.finalize(session, st.drop_export)
        return st


# -------------------- Comparisons and runs the visitor may use
def _allowed(session: visitor.Session, show_all: bool | None = None) -> dict[str, Path]:
    """Folder name -> folder, for the finished comparisons this visitor may open, inside the runs root."""
    root = visitor.runs_dir().resolve()
    show = visitor.shared_history_default() if show_all is None else show_all
    return {f.name: f for f in visitor.run_folders(session, show)
            if f.resolve().is_relative_to(root) and not visitor.is_active(f)}


def folder_of(session: visitor.Session, name: str | None, show_all: bool | None = None) -> Path:
    """The run folder called ``name`` in the visitor's list (never a path from the page).

    Raises:
        gr.Error: no name, or not one of the visitor's finished comparisons.
    """
    if not name:
        raise gr.Error("Pick a comparison first.", print_exception=False)
    folder = _allowed(session, show_all).get(str(name))
    if folder is None:
        raise gr.Error("That comparison is not in your list (still running, or removed); press Refresh.",
                       print_exception=False)
    return folder


def _results(folder: Path) -> dict[str, Any]:
    try:
        from bora_lab.record import load_results

        return load_results(folder)
    except Exception as err:  # noqa: BLE001 - a damaged file: one line for people
        raise gr.Error(f"Could not read this comparison: {common.error_message(err)}", print_exception=False) from None


def refresh(session: visitor.Session, current: str | None):
    """The visitor's finished comparisons, newest first, this visit's marked; keeps ``current`` if still there."""
    mine = {p.resolve() for p in session.run_dirs}
    choices = [(f"{'this visit · ' if f.resolve() in mine else ''}{name}", name)
               for name, f in _allowed(session).items()]
    names = [v for _, v in choices]
    return gr.update(choices=choices, value=current if current in names else (names[0] if names else None))


def run_choices(results: dict[str, Any]) -> tuple[list[tuple[str, str]], list[str]]:
    """``(choices, the runs with a saved adapter)`` for the runs dropdown."""
    choices, saved = [], []
    for run in results.get("runs", []):
        ok = bool((run.get("adapter") or {}).get("saved"))
        choices.append((f"{run['run_id']} · {run.get('status', '?')}{'' if ok else ' · no saved adapter'}",
                        run["run_id"]))
        saved += [run["run_id"]] if ok else []
    return choices, saved


def pick_source(session: visitor.Session, name: str | None):
    """A comparison was chosen: its runs (those with a saved adapter pre-selected), what it is, which controls;
    the previous answers are cleared."""
    if not name:
        return (gr.update(choices=[], value=[]), "Finish a comparison (Compare tab) or save one, then pick it here.",
                gr.update(visible=False), gr.update(choices=[], value=None), "", *_hidden())
    results = _results(folder_of(session, name))
    task = results.get("task") or {}
    choices, saved = run_choices(results)
    cfg = results.get("config") or {}
    kind = task.get("kind", "?")
    about = (f"**{task.get('name', cfg.get('task', '?'))}** ({kind}) on `{cfg.get('model', '?')}`, "
             f"{cfg.get('steps', '?')} steps. " + ("Type a text to continue." if kind == "causal_lm" else
                                                  "Type a text to classify." if kind in ("classification", "regression")
                                                  else "This task has no text to try (synthetic weights)."))
    if not saved:
        about += " None of its runs kept a saved adapter (cancelled before any step, or too large to keep)."
    return (gr.update(choices=choices, value=saved[:MAX_RUNS]), about, gr.update(visible=kind == "causal_lm"),
            gr.update(choices=choices, value=saved[0] if saved else None), "", *_hidden())


# -------------------- Loaded runs (cached per visitor)
def loaded(session: visitor.Session, folder: Path, run_id: str):
    """The run rebuilt from its folder (``engine.reload.load_run``), from this visitor's cache when there.

    Raises:
        FileNotFoundError, ValueError: from ``load_run`` (no saved adapter, tensors not kept...).
    """
    from bora_lab.engine.reload import load_run

    st = state_of(session)
    key = (folder.name, run_id)
    with st.lock:  # one load per visitor at a time; other visitors are not held by this lock
        if key in st.runs:
            st.runs.move_to_end(key)
            return st.runs[key]
        run = load_run(folder, run_id)
        st.runs[key] = run
        while len(st.runs) > MAX_RUNS:
            st.runs.popitem(last=False)
        return run


def _hidden() -> list:
    return [gr.update(visible=False, value=None) for _ in range(2 * SLOTS)]


def predict(session: visitor.Session, name: str | None, run_ids: list[str] | None, text: str | None,
            mode: str = "greedy", temperature: float = 0.8, max_new: float = 50, seed: float = 0) -> Iterator[tuple]:
    """Each chosen run's answer to ``text``, next to the base model's: yields ``(status, *labels, *texts)``.

    Classification: one ``gr.Label`` of class probabilities per run. Causal LM: one text per run,
    streamed token by token (greedy, or sampled at ``temperature`` with ``seed``). Bad input gives a
    warning and a status line, never an exception.
    """
    from bora_lab.engine.reload import predict as run_predict

    problem = ("Type a text first." if not (text or "").strip() else
               f"The text has {len(text):,} characters; at most {MAX_CHARS:,}." if len(text) > MAX_CHARS else
               "Pick at least one run." if not run_ids else
               f"Pick at most {MAX_RUNS} runs." if len(run_ids) > MAX_RUNS else None)
    if problem:
        gr.Warning(problem)
        yield (f"⚠ {problem}", *[gr.skip()] * (2 * SLOTS))
        return
    folder = folder_of(session, name)
    known = {r["run_id"] for r in _results(folder).get("runs", [])}
    runs, failed = {}, []
    t0 = time.monotonic()
    for i, rid in enumerate(run_ids):
        if rid not in known:
            failed.append(f"{rid}: not a run of this comparison")
            continue
        yield (f"Loading {rid} ({i + 1} of {len(run_ids)})…", *[gr.skip()] * (2 * SLOTS))
        try:
            runs[rid] = loaded(session, folder, rid)
        except Exception as err:  # noqa: BLE001 - no adapter, not kept, damaged: said per run
            failed.append(f"{rid}: {common.error_message(err)}")
    note = "".join(f"\n\n⚠ {f}" for f in failed)
    if failed:
        gr.Warning("; ".join(failed))
    if not runs:
        yield ("Nothing to run." + note, *_hidden())
        return
    first = next(iter(runs.values()))
    kind = first.pipeline.task.kind
    # the untuned base the runs started from: the engine's pristine model, head seeded, no adapter
    named = {**runs, "base": dataclasses.replace(first, run_id="base", model=first.pipeline.pristine().eval(),
                                                 adapter_config={})}
    titles = {rid: rid for rid in runs} | {"base": BASE_LM if kind == "causal_lm" else BASE_CLS}
    where = f"Each run as it was at the end of its training (ready in {time.monotonic() - t0:.1f} s)." + (
        "" if kind == "causal_lm" else " *base · untrained head*: the pretrained model with the freshly initialised "
        "head every run started from, nothing trained: a chance-level reference.")
    if kind != "causal_lm":
        try:
            answers = {rid: run_predict(r, [text])[0] for rid, r in named.items()}
        except ValueError as err:
            yield (f"⚠ {common.error_message(err)}{note}", *_hidden())
            return
        labels = [gr.update(visible=True, label=f"{titles[rid]}: {a['label']}", value=a["probabilities"])
                  if "probabilities" in a else gr.update(visible=True, label=titles[rid], value=f"{a['value']:.4g}")
                  for rid, a in answers.items()]
        labels += [gr.update(visible=False, value=None)] * (SLOTS - len(labels))
        yield (where + note, *labels, *[gr.update(visible=False, value=None)] * SLOTS)
        return
    yield from _stream(named, titles, text, mode, temperature, max_new, seed, where + note)


def _stream(named: dict[str, Any], titles: dict[str, str], text: str, mode: str, temperature: float,
            max_new: float, seed: float, status: str) -> Iterator[tuple]:
    """Causal LM: every continuation, side by side, as it grows."""
    from bora_lab.engine.generate import side_by_side, stream_continuation

    temp = float(temperature) if mode == "sampled" else 0.0
    n = int(min(max(int(max_new or 1), 1), MAX_NEW_TOKENS))
    how = (f"sampled at temperature {temp:g} with seed {int(seed or 0)} for every model (the same random draws: "
           "differences come from the models)" if temp > 0 else "greedy")
    streams = {rid: stream_continuation(r.model, r.pipeline.tokenizer, text, n, temp, int(seed or 0))
               for rid, r in named.items()}
    hidden = [gr.update(visible=False, value=None)] * SLOTS
    outs = lambda texts: ([gr.update(visible=True, label=titles[rid], value=texts.get(rid, ""))
                           for rid in named] + [gr.update(visible=False, value=None)] * (SLOTS - len(named)))
    last, texts = 0.0, {}
    try:
        for texts in side_by_side(streams):
            if time.monotonic() - last >= STREAM_EVERY_S:
                last = time.monotonic()
                yield (f"Generating, {how}…", *hidden, *outs(texts))
    except Exception as err:  # noqa: BLE001 - a method whose generation fails: one line
        yield (f"⚠ Generation failed: {common.error_message(err)}", *hidden, *outs(texts))
        return
    yield (f"{status} Up to {n} new tokens, {how}.", *hidden, *outs(texts))


# -------------------- Where they disagree
def examples_of(session: visitor.Session, folder: Path, run_ids: list[str]) -> list[dict[str, Any]]:
    """The comparison's evaluation texts and labels (``record.disagree.eval_examples``), cached per visitor:
    from a run already loaded (or the first chosen one loaded now), else from a fresh pipeline."""
    from bora_lab.record.disagree import eval_examples

    st = state_of(session)
    if folder.name in st.examples:
        return st.examples[folder.name]
    with st.lock:
        pipeline = next((r.pipeline for (f, _), r in st.runs.items() if f == folder.name), None)
    for rid in run_ids if pipeline is None else ():
        try:
            pipeline = loaded(session, folder, rid).pipeline
            break
        except (FileNotFoundError, ValueError):
            continue
    if pipeline is None:  # no run could be loaded: the task's pipeline alone gives the texts
        from bora_lab.config import RunConfig
        from bora_lab.engine import tasks, trainer

        cfg = RunConfig.from_dict(_results(folder).get("config") or {})
        pipeline = trainer.make_pipeline(cfg, tasks.load_task(cfg))
    st.examples[folder.name] = eval_examples(pipeline, (_results(folder).get("config") or {}).get("seed"))
    return st.examples[folder.name]


def disagree(session: visitor.Session, name: str | None, run_ids: list[str] | None, at_label: str | None):
    """``(summary, table)`` of the test examples on which the chosen runs answer differently."""
    import pandas as pd

    from bora_lab.record.disagree import disagreements

    if not name or not run_ids or len(run_ids) < 2:
        return "Pick two or more runs to see the test examples they disagree on.", pd.DataFrame()
    folder = folder_of(session, name)
    results = _results(folder)
    try:
        examples = examples_of(session, folder, list(run_ids))
    except Exception as err:  # noqa: BLE001 - the counts do not need the texts
        gr.Warning(f"The test texts could not be loaded: {common.error_message(err)}")
        examples = None
    found = disagreements(results, list(run_ids), examples, at=AT.get(at_label or "", "final"))
    return found.summary, pd.DataFrame(found.rows, columns=found.columns)


# -------------------- Export
def export(session: visitor.Session, name: str | None, run_id: str | None, fmt: str,
           show_all: bool | None = None) -> tuple[str, str | None]:
    """Export one run as a PEFT adapter (``fmt="peft"``) or a merged model (``"merged"``), zipped.

    Returns:
        ``(status line, path of the zip or None)``. A method that has no such form, or a run without a
        saved adapter, gives its one-line reason (also as a warning), never a traceback.
    """
    from bora_lab.engine.reload import export_merged, export_peft

    if fmt not in FORMATS:
        raise gr.Error(f"Unknown export format {fmt!r}.", print_exception=False)
    if not run_id:
        gr.Warning("Pick a run to export.")
        return "⚠ Pick a run to export.", None
    folder = folder_of(session, name, show_all)
    if run_id not in {r["run_id"] for r in _results(folder).get("runs", [])}:
        raise gr.Error(f"{run_id} is not a run of this comparison.", print_exception=False)
    st = state_of(session)
    out = Path(tempfile.mkdtemp(prefix="bora_lab_export_"))
    try:
        run = loaded(session, folder, run_id)
        if fmt == "merged":  # export_merged swaps layers in place: work on a copy, keep the cached run intact
            run = dataclasses.replace(run, model=copy.deepcopy(run.model))
        build = out / f"{run_id}-{fmt}"
        (export_peft if fmt == "peft" else export_merged)(run, build)
        archive = shutil.make_archive(str(out / f"{run_id}-{fmt}"), "zip", out, build.name)
        shutil.rmtree(build, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(out, ignore_errors=True)
        if not isinstance(err, (ValueError, FileNotFoundError, ImportError)):
            raise
        reason = common.error_message(err).replace("--format merged", '"Export merged model"')  # the CLI's words
        gr.Warning(why := f"{run_id} has no {FORMATS[fmt]} export: {reason}")
        return f"⚠ {why}", None
    with st.lock:
        st.drop_export()  # one export kept per visitor
        st.export_dir = out
    size = Path(archive).stat().st_size / 2**20
    return f"{run_id} exported as a {FORMATS[fmt]} ({size:.1f} MB zip).", archive


# -------------------- Layout
def build_try_tab(session: gr.State) -> gr.Tab:
    """Build the "Try it" tab (inside a ``gr.Tabs``) and its wiring; returns the tab."""
    with gr.Tab(t("tab.try"), id="try") as tab:
        gr.Markdown(t("try.intro"))
        with gr.Row(equal_height=True):
            source = gr.Dropdown([], label=t("common.comparison"), scale=4, elem_id="bl-try-source")
            again = gr.Button(t("common.refresh"), size="sm", scale=0, elem_id="bl-try-refresh")
        runs = gr.Dropdown([], multiselect=True, max_choices=MAX_RUNS, label=t("try.runs") + f" (≤ {MAX_RUNS})", elem_id="bl-try-runs")
        about = gr.Markdown(elem_id="bl-try-about")
        text = gr.Textbox(lines=3, max_length=MAX_CHARS, label=t("try.text") + f" (≤ {MAX_CHARS:,})",
                          placeholder=t("try.text.example"), elem_id="bl-try-text")
        with gr.Row(visible=False) as lm_opts:
            mode = gr.Radio([(t("try.mode.greedy"), "greedy"), (t("try.mode.sampled"), "sampled")], value="greedy",
                            label=t("try.mode"), elem_id="bl-try-mode")
            temperature = gr.Slider(0.05, 2.0, value=0.8, step=0.05, label=t("try.temperature"))
            max_new = gr.Slider(1, MAX_NEW_TOKENS, value=50, step=1, label=t("try.max_new"))
            seed = gr.Number(0, precision=0, label=t("try.seed"), minimum=0)
        with gr.Row():
            go = gr.Button(t("try.go"), variant="primary", elem_id="bl-try-go")
            stop = gr.Button(t("compare.stop"), variant="stop", elem_id="bl-try-stop")
        status = gr.Markdown(elem_id="bl-try-status")
        with gr.Row(elem_id="bl-try-labels"):  # one slot per run, then the base
            labels = [gr.Label(visible=False, min_width=220, elem_id=f"bl-try-label-{i}") for i in range(SLOTS)]
            texts = [gr.Textbox(visible=False, lines=6, interactive=False, min_width=220, elem_id=f"bl-try-out-{i}")
                     for i in range(SLOTS)]
        with gr.Accordion(t("try.disagree"), open=True):
            at = gr.Radio(list(zip((t("try.at.final"), t("try.at.best")), AT)), value=next(iter(AT)),  # AT's order
                          label=t("try.at"), elem_id="bl-try-at")
            summary = gr.Markdown(elem_id="bl-try-disagree-summary")
            table = gr.Dataframe(interactive=False, wrap=True, elem_id="bl-try-disagree")
        with gr.Accordion(t("try.export"), open=False):
            with gr.Row(equal_height=True):
                export_run = gr.Dropdown([], label=t("common.run"), scale=3, elem_id="bl-try-export-run")
                peft_btn = gr.Button(t("export.peft"), scale=1, elem_id="bl-try-export-peft")
                merged_btn = gr.Button(t("export.merged"), scale=1, elem_id="bl-try-export-merged")
            export_status = gr.Markdown(elem_id="bl-try-export-status")
            export_file = gr.File(label=t("export.file"), interactive=False, elem_id="bl-try-export-file")
    own = {"concurrency_limit": CONCURRENCY, "concurrency_id": "try_it"}  # not behind training ("train")
    fast = {"concurrency_limit": None, "show_progress": "hidden"}
    chosen = [runs, about, lm_opts, export_run, status, *labels, *texts]
    shown = [session, source, runs, at]
    for trigger in (tab.select, again.click):  # a new choice of comparison fires source.change
        trigger(refresh, [session, source], source, **fast)
    source.change(pick_source, [session, source], chosen, **fast).then(disagree, shown, [summary, table], **own)
    runs.input(disagree, shown, [summary, table], **own)
    at.input(disagree, shown, [summary, table], **own)
    inputs = [session, source, runs, text, mode, temperature, max_new, seed]
    events = [trigger(predict, inputs, [status, *labels, *texts], show_progress="minimal", show_progress_on=[status],
                      **own) for trigger in (go.click, text.submit)]
    stop.click(None, None, None, cancels=events, concurrency_limit=None)
    for btn, fmt in ((peft_btn, "peft"), (merged_btn, "merged")):
        btn.click(functools.partial(export, fmt=fmt), [session, source, export_run], [export_status, export_file],
                  **own)
    return tab
