"""The "Paper claims" tab: each claim of the source papers, the paper's value, ours with its interval.

Opening a claim shows its recorded result at once (``bora_lab/teach/claims/records``); Run measures
it again here: counting claims in a second, training claims as a comparison with seeds that waits in
the same queue as every training (one at a time across visitors). A result measured in the app is
shown to its visitor only; the repo's records are written by ``bora-lab reproduce CLAIM --save``.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any

import gradio as gr

from . import common, form
from .i18n import t

MAX_SEEDS = 5  # a public Space: a claim re-run here trains at most this many seeds per method


def _claims():
    from bora_lab.teach import claims

    return claims


def claim_choices() -> list[tuple[str, str]]:
    return [(c["title"], c["id"]) for c in _claims().catalogue()]


def overview() -> list[list[Any]]:
    """One row per claim: title, source, recorded verdict, date."""
    claims, rows = _claims(), []
    for c in claims.catalogue():
        rec = claims.record_of(c["id"])
        state = "no record yet" if not rec else rec["verdict"] + (" (out of date)" if rec.get("stale") else "")
        rows.append([c["title"], claims.paper_cite(c), state, rec["created"] if rec else ""])
    return rows


def _value(ours: dict | None, unit: str) -> str:
    from bora_lab.teach.claims.text import format_value

    return format_value(ours, unit)


def render(claim_id: str | None, record: dict | None = None) -> tuple[str, list[list[Any]], Any]:
    """Markdown, table rows and figure of ``claim_id`` (its recorded result unless ``record`` is given)."""
    from bora_lab.figures.claims import claim_figure

    claims = _claims()
    if not claim_id:
        return "Choose a claim.", [], claim_figure(None)
    try:
        c = claims.get_claim(claim_id)
    except claims.ClaimError as err:
        return f"**{err}**", [], claim_figure(None)
    rec = record or claims.record_of(claim_id)
    parts = [f"### {c['title']}", f"*{claims.paper_cite(c)}*", f"**The claim.** {c['claim']}",
             f"**The paper's numbers.** {c['paper_value']['text']}"]
    if c.get("axis_note"):
        parts.append(f"**Axes.** {c['axis_note']}")
    if rec:
        where = "measured now, in this visit" if record else f"recorded {rec['created']}"
        stale = " — **out of date**: the experiment changed since; press Run." if rec.get("stale") else ""
        parts += [f"**Verdict: {rec['verdict']}** ({where}{stale})", rec["explanation"], f"**Budget.** {rec['budget']}"]
    else:
        parts.append("**No recorded result yet.** Press Run to measure it.")
    rows = [[r["label"], r["paper"] if isinstance(r["paper"], str) else f"{r['paper']:g}", _value(r.get("ours"), r["unit"]),
             r["unit"], r["verdict"] or "context"] for r in (rec or {}).get("rows", [])]
    return "\n\n".join(parts), rows, claim_figure(rec)


def _seeds(text: str, claim: dict) -> list[int] | None:
    seeds = form._int_list(text, "seeds") or None
    if seeds and len(seeds) > MAX_SEEDS:
        raise ValueError(f"at most {MAX_SEEDS} seeds here (the command line takes more: bora-lab reproduce {claim['id']} --seeds ...)")
    return seeds


def run_claim(claim_id: str | None, seeds_text: str):
    """Generator: (status html, markdown, rows, figure) while the claim's experiment runs, then its result."""
    claims = _claims()
    if not claim_id:
        yield "Choose a claim first.", *render(None)
        return
    try:
        claim = claims.get_claim(claim_id)
        seeds = _seeds(seeds_text, claim) if claim["experiment"]["kind"] in claims.TRAINING else None
    except ValueError as err:
        yield f"<b>Cannot run:</b> {common.error_message(err)}", *render(claim_id)
        return
    events: queue.Queue = queue.Queue()
    box: dict[str, Any] = {}
    cancel = threading.Event()

    def work():
        try:
            box["record"] = claims.reproduce(claim_id, seeds=seeds, cancel=cancel, on_event=events.put)
        except Exception as err:  # noqa: BLE001 - shown to the visitor; nothing recorded
            box["error"] = err
        finally:
            events.put(None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    start = time.monotonic()
    try:
        while True:
            ev = events.get()
            if ev is None:
                break
            if getattr(ev, "kind", "") == "progress":
                yield (common.progress_html(ev.done_steps, ev.total_steps, time.monotonic() - start, ev.eta_s),
                       gr.skip(), gr.skip(), gr.skip())
    finally:
        if thread.is_alive():  # the visitor left or pressed Stop: stop the training at its next step
            cancel.set()
    if "error" in box:
        yield f"<b>Not measured:</b> {common.error_message(box['error'])}", *render(claim_id)
        return
    rec = box["record"]
    yield f"Measured in {common.fmt_duration(rec['elapsed_s'])}: {rec['verdict']}.", *render(claim_id, rec)


def build_claims_tab() -> None:
    """Add the "Paper claims" tab (call inside the app's ``gr.Tabs()``)."""
    with gr.Tab(t("tab.claims"), id="claims") as tab:
        gr.Markdown(t("claims.intro"))
        table = gr.Dataframe(headers=["claim", "source", "recorded verdict", "recorded"], interactive=False,
                             wrap=True, elem_id="bl-claims-overview")
        with gr.Row():
            pick = gr.Dropdown(choices=claim_choices(), value=None, label=t("claims.claim"), scale=3,
                               elem_id="bl-claim-pick")
            seeds = gr.Textbox(label=t("claims.seeds"), placeholder=t("claims.seeds.example"), scale=1)
            run = gr.Button(t("compare.run"), variant="primary", scale=0, elem_id="bl-claim-run")
            stop = gr.Button(t("compare.stop"), variant="stop", scale=0)
        status = gr.HTML(elem_id="bl-claim-status")
        text = gr.Markdown(elem_id="bl-claim-text")
        rows = gr.Dataframe(headers=["row", "paper", "ours [95% interval]", "unit", "verdict"], interactive=False,
                            wrap=True, elem_id="bl-claim-rows")
        fig = gr.Plot(elem_id="bl-claim-plot")
    tab.select(overview, None, table, concurrency_limit=None, show_progress="hidden")
    pick.change(render, [pick], [text, rows, fig], concurrency_limit=None)
    evt = run.click(run_claim, [pick, seeds], [status, text, rows, fig], concurrency_limit=1, concurrency_id="train")
    stop.click(None, None, None, cancels=[evt])
