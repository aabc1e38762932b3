"""The "Memory" tab: a training-memory estimate as a stacked bar, next to a run's measured peak.

The arithmetic is ``bora_lab.teach.memory.estimate_memory`` (see its docstring for every formula);
"Lecture example" fills the lecture's QLoRA case (Llama-3-8B, NF4, 48 M trainable parameters).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr

from bora_lab.methods import registry

from . import common, visitor
from .i18n import t

SOURCES = ("model id", "typed sizes")
PRECISIONS = ["fp32", "bf16", "int8", "nf4"]
PREC_CHOICES = ["auto", "fp32", "bf16"]
# Bounds are checked by bora_lab.teach.memory, whose messages name the field (Gradio's own
# minimum/maximum errors do not), so the Number widgets here carry none.
# The worked example of the lecture notes "Parameter-Efficient Fine-Tuning" (QLoRA: "How does QLoRA reduce memory to 14GB?").
LECTURE = {"source": "typed sizes", "name": "Llama-3-8B (lecture)", "params": 8e9, "layers": 32, "hidden": 4096, "vocab": 128256, "heads": 32,
           "kv_heads": 8, "method": "qlora", "rank": 16, "precision": "nf4", "optimizer": "adamw_8bit",
           "batch": 1, "seq": 512, "trainable": 48_000_000, "adapter_prec": "bf16", "grad_prec": "fp32",
           "quantize_all": True}
PEAK_KIND = {"process_peak_rss": "measured: process peak RSS (whole app process: PyTorch, data, runs side by side)",
             "cuda_max_memory_allocated": "measured peak: CUDA max_memory_allocated"}


def estimate(source, model_id, num_layers, name, params, layers, hidden, vocab, heads, kv_heads, method, rank, precision,
             optimizer, batch, seq, checkpointing, flash, trainable, adapter_prec, grad_prec, compute_prec, quantize_all,
             measured, measured_kind):
    """Widget values -> (figure, table rows, Markdown notes)."""
    from bora_lab.figures.memory_bars import memory_figure
    from bora_lab.teach import memory as M

    def num(v: Any) -> float:  # an emptied Number widget gives None
        return float(v or 0)

    try:
        if source == "typed sizes":
            spec = M.spec_from_sizes(num(params), int(num(layers)), int(num(hidden)), int(num(vocab)),
                                     int(num(heads)) or None, n_kv_heads=int(num(kv_heads)) or None,
                                     name=(name or "").strip() or "typed sizes")
        else:
            spec = M.spec_from_model((model_id or "minilm").strip(), num_layers=int(num(num_layers)) or None)
        b = M.estimate_memory(spec, method, int(num(rank)), precision, int(num(batch)), int(num(seq)), optimizer,
                              bool(checkpointing), flash_attention=bool(flash),
                              trainable_params=int(num(trainable)) or None,
                              adapter_precision=None if adapter_prec == "auto" else adapter_prec,
                              grad_precision=None if grad_prec == "auto" else grad_prec,
                              compute_precision=None if compute_prec == "auto" else compute_prec,
                              quantize_all=bool(quantize_all))
    except Exception as err:  # noqa: BLE001  bad sizes, unknown model offline, rank too large...
        return None, [], f"**Cannot estimate:** {common.error_message(err)}"
    fig = memory_figure(b, measured_mb=num(measured) or None,
                        measured_label=PEAK_KIND.get(measured_kind or "", "measured peak"))
    per = b["per_trainable_bytes"]
    p = b["params"]
    lines = [
        (f"**{spec.name}**: {p['base']:,} parameters, {p['trainable']:,} trainable "
         f"({100 * p['trainable'] / max(p['base'], 1):.3f}%), of which {p['added']:,} in new tensors."),
        ("**Bytes per trainable parameter** (the lecture's bill): " + " + ".join(f"{v:g} {k}" for k, v in per.items())
         + f" = **{b['per_trainable_total']:g} B**"),
        ("Without activations (weights, adapter, gradients, optimizer): "
         f"**{(b['total'] - b['components']['activations']) / 1e9:.3f} GB**."),
        f"Activations: {b['details']['activation_formula']}; logits {b['details']['logits'] / 1e9:.3f} GB.",
        *[f"- {n}" for n in b["notes"]],
    ]
    return fig, M.summary_rows(b), "\n\n".join(lines)


def saved_runs(session: Any = None) -> list[tuple[str, str]]:
    """``(label, "folder|run_id")`` for each saved run with a measured peak this visitor may see."""


    show_all = visitor.shared_history_default()
    if session is None and not show_all:
        return []
    out = []
    for folder in visitor.run_folders(session, show_all):
        try:
            results = json.loads((folder / visitor.RESULTS_FILE).read_text())
        except (OSError, ValueError):
            continue
        for run in results.get("runs", []):
            peak = (run.get("summary") or {}).get("peak_mem_mb") or run.get("peak_mem_mb")
            if peak:
                out.append((f"{folder.name} · {run['run_id']} · {peak:,.0f} MiB", f"{folder}|{run['run_id']}"))
    return out


def from_saved_run(choice: str | None, session: Any = None) -> list[Any]:
    """Widget updates that describe a saved run: source, model, layers kept, method, rank, precision,
    optimizer, batch, sequence length, adapter/gradient/compute precision, measured peak (MiB) and what
    the peak measures. BoRA Lab's trainer keeps trainable tensors in fp32 and computes in fp32 on the
    CPU, bf16 (autocast) on CUDA."""
    from bora_lab.teach.memory import method_defaults

    allowed = {value for _, value in saved_runs(session)}
    if not choice or choice not in allowed:
        return [gr.update()] * 14
    folder, run_id = choice.rsplit("|", 1)
    results = json.loads((Path(folder) / "results.json").read_text())
    cfg = results.get("config", {})
    run = next(r for r in results["runs"] if r["run_id"] == run_id)
    defaults = method_defaults(run["method"]) if run["method"] in registry.METHODS else {}
    peak = (run.get("summary") or {}).get("peak_mem_mb") or run.get("peak_mem_mb")
    return ["model id", cfg.get("model", "minilm"), cfg.get("num_layers") or 0, run["method"], run["rank"],
            defaults.get("precision", "fp32"), defaults.get("optimizer", "adamw"), cfg.get("batch_size", 16),
            cfg.get("max_length", 128), "fp32", "fp32", "bf16" if str(results.get("device", "")).startswith("cuda")
            else "fp32", peak, results.get("peak_mem_kind") or ""]


def build_memory_tab(session: gr.State | None = None) -> None:
    """Add the "Memory" tab (call inside the app's ``gr.Tabs()``).

    Args:
        session: the app's ``gr.State(visitor.Session())``; with it, the visitor's own saved runs can be
            picked to show their measured peak (without it, only when shared history is on).
    """
    from bora_lab.teach.memory import OPTIMIZERS

    methods = registry.available()
    with gr.Tab(t("tab.memory"), id="memory") as tab:
        gr.Markdown(t("memory.intro"))
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                lecture = gr.Button(t("memory.lecture"), elem_id="bl-mem-lecture")
                source = gr.Radio([(t("memory.source.model_id"), SOURCES[0]), (t("memory.source.typed"), SOURCES[1])],
                                  value="model id", label=t("memory.source"))
                with gr.Row():
                    model_id = gr.Dropdown(["minilm", "smollm2"], value="minilm", allow_custom_value=True,
                                           label=t("memory.model_id"), info=t("memory.model_id.help"))
                    num_layers = gr.Number(0, precision=0, label=t("field.num_layers"), info=t("memory.zero_all"))
                with gr.Accordion(t("memory.typed"), open=False):
                    name = gr.Textbox("typed sizes", max_lines=1, label=t("memory.name"))
                    with gr.Row():
                        params = gr.Number(8e9, label=t("memory.params"))
                        layers = gr.Number(32, precision=0, label=t("memory.layers"))
                        hidden = gr.Number(4096, precision=0, label=t("memory.hidden"))
                    with gr.Row():
                        vocab = gr.Number(128256, precision=0, label=t("memory.vocab"))
                        heads = gr.Number(32, precision=0, label=t("memory.heads"), info=t("memory.heads.help"))
                        kv_heads = gr.Number(8, precision=0, label=t("memory.kv_heads"), info=t("memory.kv_heads.help"))
                with gr.Row():
                    method = gr.Dropdown(methods, value="lora" if "lora" in methods else methods[0],
                                         label=t("common.method"))
                    rank = gr.Number(8, precision=0, label=t("common.rank"))
                with gr.Row():
                    precision = gr.Radio(PRECISIONS, value="fp32", label=t("memory.precision"))
                    optimizer = gr.Dropdown(list(OPTIMIZERS), value="adamw", label=t("memory.optimizer"))
                with gr.Row():
                    batch = gr.Number(16, precision=0, label=t("field.batch_size"))
                    seq = gr.Number(128, precision=0, label=t("memory.seq"))
                with gr.Row():
                    checkpointing = gr.Checkbox(False, label=t("field.grad_checkpointing"))
                    flash = gr.Checkbox(False, label=t("memory.flash"))
                with gr.Accordion(t("memory.advanced"), open=False):
                    trainable = gr.Number(0, label=t("memory.trainable"), info=t("memory.trainable.help"))
                    with gr.Row():
                        adapter_prec = gr.Dropdown(PREC_CHOICES, value="auto", label=t("memory.adapter_prec"))
                        grad_prec = gr.Dropdown(PREC_CHOICES, value="auto", label=t("memory.grad_prec"))
                        compute_prec = gr.Dropdown(PREC_CHOICES, value="auto", label=t("memory.compute_prec"))
                    quantize_all = gr.Checkbox(False, label=t("memory.quantize_all"), info=t("memory.quantize_all.help"))
                with gr.Row():
                    measured = gr.Number(0, label=t("memory.measured"), info=t("memory.measured.help"))
                    measured_kind = gr.Textbox("", visible=False)
                with gr.Row():
                    run_pick = gr.Dropdown([], value=None, label=t("memory.run_pick"), scale=3)
                    refresh = gr.Button(t("memory.refresh"), scale=1, size="sm")
            with gr.Column(scale=3):
                plot = gr.Plot(label=t("memory.plot"), elem_id="bl-mem-plot")
                table = gr.Dataframe(headers=["component", "GB", "share %"], label=t("memory.breakdown"),
                                     interactive=False)
                notes = gr.Markdown(elem_id="bl-mem-notes")

    inputs = [source, model_id, num_layers, name, params, layers, hidden, vocab, heads, kv_heads, method, rank, precision,
              optimizer, batch, seq, checkpointing, flash, trainable, adapter_prec, grad_prec, compute_prec, quantize_all,
              measured, measured_kind]
    outputs = [plot, table, notes]
    tab.select(estimate, inputs, outputs, concurrency_limit=None)
    for w in inputs:
        if w is not measured_kind:
            w.input(estimate, inputs, outputs, concurrency_limit=None, show_progress="hidden")

    def on_method(name):
        from bora_lab.teach.memory import method_defaults

        d = method_defaults(name)
        return gr.update(value=d.get("precision", "fp32")), gr.update(value=d.get("optimizer", "adamw"))

    method.input(on_method, method, [precision, optimizer], concurrency_limit=None).then(
        estimate, inputs, outputs, concurrency_limit=None)

    def on_lecture():
        x = LECTURE
        return [x["source"], x["name"], x["params"], x["layers"], x["hidden"], x["vocab"], x["heads"], x["kv_heads"], x["method"],
                x["rank"], x["precision"], x["optimizer"], x["batch"], x["seq"], x["trainable"], x["adapter_prec"],
                x["grad_prec"], "auto", x["quantize_all"], 0]

    lecture.click(on_lecture, None, [source, name, params, layers, hidden, vocab, heads, kv_heads, method, rank, precision,
                                     optimizer, batch, seq, trainable, adapter_prec, grad_prec, compute_prec, quantize_all,
                                     measured],
                  concurrency_limit=None).then(estimate, inputs, outputs, concurrency_limit=None)

    state_in = [session] if session is not None else []
    refresh.click(lambda *s: gr.update(choices=saved_runs(*s)), state_in, run_pick, concurrency_limit=None)

    run_pick.input(from_saved_run, [run_pick, *state_in],
                   [source, model_id, num_layers, method, rank, precision, optimizer, batch, seq, adapter_prec,
                    grad_prec, compute_prec, measured, measured_kind],
                   concurrency_limit=None).then(estimate, inputs, outputs, concurrency_limit=None)
