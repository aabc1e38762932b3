"""Rebuild a trained run from its folder: the pristine model, the method, and the saved tensors.

    from bora_lab.engine.reload import load_run
    run = load_run("runs/20261203-...", "dora-r8")
    run.model(**batch).logits      # the model as it was at the end of training (eval mode)
    best = load_run("runs/20261203-...", "dora-r8", which="best")  # at its best validation evaluation

The folder keeps only what training changed (``adapters/<run_id>/adapter.safetensors``: the adapter,
the trained head, the adapter modules' buffers; ``adapter_best.safetensors``: the same at the best
validation evaluation, when the comparison had a validation split); the base is rebuilt from the model
id of ``config.json`` exactly as the engine built that run: with the run's own seed (head and adapter
initialisation, frozen random factors such as VeRA's, batch order) and the comparison's eval subset
(``eval_seed = cfg.seed``, as :func:`bora_lab.engine.trainer.compare`), then the tensors are loaded over it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..record.files import ADAPTERS_DIR
from .pipeline import Pipeline
from .runstate import RunState, pick_device
from .tasks import load_task
from .trainer import make_pipeline

CHECKPOINTS = {"final": "adapter.safetensors", "best": "adapter_best.safetensors"}


# the hub id whose weights equal an offline model's (SmolLM2's went through a 4-bit GGUF: no hub id is the same)
PUBLIC_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}


@dataclass
class LoadedRun:
    """A trained run, rebuilt: ``model`` (eval mode), the ``pipeline`` (tokenizer, eval data), the run's
    config (the comparison's, with the run's seed), which checkpoint (``"final"``/``"best"``) at which step."""

    run_id: str
    model: torch.nn.Module
    pipeline: Pipeline
    cfg: RunConfig
    adapter_config: dict[str, Any]
    which: str = "final"
    step: int | None = None


def load_run(run_dir: str | Path, run_id: str, device: str = "cpu", which: str = "final") -> LoadedRun:
    """The model of ``run_id`` as it was at the end of its training (``which="final"``) or at its best
    validation evaluation (``which="best"``, the step ``adapter_config["best_step"]``, as ``results.json``).

    Raises:
        FileNotFoundError: the folder has no saved tensors for that run (or no best checkpoint: the
            comparison had no validation split).
        ValueError: the run's tensors were not kept (the reason is given), or do not fit the model.
    """
    from safetensors.torch import load_file

    if which not in CHECKPOINTS:
        raise ValueError(f"which must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
    folder = Path(run_dir)
    meta_path = folder / ADAPTERS_DIR / run_id / "adapter_config.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no saved adapter for run {run_id!r} in {folder.name}")
    meta = json.loads(meta_path.read_text())
    if not meta.get("saved"):
        raise ValueError(f"run {run_id!r} kept no tensors: {meta.get('reason')}")
    path = folder / ADAPTERS_DIR / run_id / CHECKPOINTS[which]
    if not path.is_file():
        raise FileNotFoundError(f"run {run_id!r} has no best-validation checkpoint: its comparison had no "
                                "validation split (val_samples = 0)" if which == "best"
                                else f"run {run_id!r} has no {path.name} in {folder.name}")
    cfg = RunConfig.from_dict(json.loads((folder / "config.json").read_text()))
    plan = {rid: (method, rank, seed) for rid, method, rank, seed, _ in cfg.run_plan()}
    if run_id not in plan:
        raise ValueError(f"run {run_id!r} is not in this comparison; runs: {', '.join(plan)}")
    method, rank, seed = plan[run_id]
    run_cfg = dataclasses.replace(cfg, seed=seed, seeds=None)  # as compare() builds each seed's runs
    pipeline = make_pipeline(run_cfg, load_task(cfg), eval_seed=cfg.seed)
    state = RunState(run_id, method, rank, run_cfg, pipeline, pick_device(device), None)
    tensors = load_file(str(path))
    result = state.model.load_state_dict(tensors, strict=False)
    trained = {n for n, p in state.model.named_parameters() if p.requires_grad}
    if result.unexpected_keys or trained - set(tensors):
        raise ValueError(f"the saved tensors do not fit {method!r} on {cfg.model!r}: unexpected "
                         f"{result.unexpected_keys[:3]}, missing {sorted(trained - set(tensors))[:3]}")
    model = state.model.eval()
    step = meta.get("best_step") if which == "best" else meta.get("step")
    return LoadedRun(run_id, model, pipeline, run_cfg, meta, which, step)


@torch.no_grad()
def predict(run: LoadedRun, texts: list[str], max_new_tokens: int = 30) -> list[dict[str, Any]]:
    """What the trained run says about each text.

    Classification: ``{"text", "label", "probabilities": {label: p}}``; regression: ``{"text",
    "value"}``; causal LM: ``{"text", "continuation"}`` (greedy, ``max_new_tokens``).

    Raises:
        ValueError: the run's task has no text (the synthetic weight-recovery tasks).
    """
    task = getattr(run.pipeline, "task", None)
    tokenizer = getattr(run.pipeline, "tokenizer", None)
    if task is None or tokenizer is None or task.kind not in ("classification", "regression", "causal_lm"):
        raise ValueError(f"run {run.run_id!r} was trained on {run.cfg.task!r}, which takes no text")
    device = next(run.model.parameters()).device
    if task.kind == "causal_lm":
        out = []
        for text in texts:  # one at a time: no padding side to worry about
            ids = tokenizer(text, return_tensors="pt").to(device)
            gen = run.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            out.append({"text": text, "continuation": tokenizer.decode(gen[0, ids["input_ids"].shape[1]:],
                                                                       skip_special_tokens=True)})
        return out
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=run.cfg.max_length,
                    return_tensors="pt").to(device)
    logits = run.model(**enc).logits.float()
    if task.kind == "regression":
        return [{"text": t, "value": float(v)} for t, v in zip(texts, logits[:, 0])]
    names = task.label_names or [str(i) for i in range(logits.shape[-1])]
    probs = logits.softmax(-1)
    return [{"text": t, "label": names[int(p.argmax())], "probabilities": dict(zip(names, map(float, p)))}
            for t, p in zip(texts, probs)]


# model-level methods that only change existing parameters in place: the model is already a plain one
_PLAIN_AFTER_TRAINING = ("bitfit", "head", "features", "full_model")


@torch.no_grad()
def export_merged(run: LoadedRun, out_dir: str | Path) -> Path:
    """Save the trained run as a plain ``transformers`` model (``save_pretrained`` + tokenizer), loadable
    with ``AutoModelFor...`` without BoRA Lab: every wrapped layer becomes an ``nn.Linear`` holding its
    merged weight ``effective_weight()``.

    Raises:
        ValueError: the method adds modules or inputs that no plain model has (Houlsby adapters, prompt,
            P-tuning and prefix tuning), or the model stores its layers as GPT-2 ``Conv1D``.
    """
    from torch import nn

    from .. import methods
    from ..methods.whole_model import adapter_layers

    method = run.adapter_config.get("method")
    info = methods.info(method)
    if not (info["mergeable"] or method in _PLAIN_AFTER_TRAINING):
        raise ValueError(f"{method!r} adds modules or inputs that a plain model does not have: no merged export "
                         "(it changes the input or adds layers, not the weights)")
    model, pristine = run.model, run.pipeline.pristine()
    for name, layer in list(adapter_layers(model)):
        if type(pristine.get_submodule(name)).__name__ == "Conv1D":  # wrapped as a Linear: check the original
            raise ValueError("merged export of GPT-2-style Conv1D layers is not supported")
        w, b = layer.effective_weight(), layer.bias
        plain = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
        plain.weight.copy_(w)
        if b is not None:
            plain.bias.copy_(b)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)
    for attr in ("bora_lab_config",):
        model.__dict__.pop(attr, None)
    out = Path(out_dir)
    model.save_pretrained(out)
    run.pipeline.tokenizer.save_pretrained(out)
    return out


def export_peft(run: LoadedRun, out_dir: str | Path) -> Path:
    """Save the trained run as a PEFT adapter (``PeftModel.from_pretrained`` on the run's base model).

    Which methods and how: :mod:`bora_lab.methods.peft_export` and ``docs/export.md``.

    Raises:
        ValueError: the method has no PEFT equivalent (the message says why and whether
            ``export_merged`` applies).
    """
    from ..methods import export_peft as to_peft

    folder = Path(to_peft(run.model, out_dir, base_model_name_or_path=run.cfg.model, total_steps=run.cfg.steps))
    config = folder / "adapter_config.json"
    meta = json.loads(config.read_text())
    if Path(str(meta.get("base_model_name_or_path") or "")).is_absolute():  # an offline model's folder on this machine
        meta["base_model_name_or_path"] = PUBLIC_IDS.get(run.cfg.model.strip().lower(), run.cfg.model)
        config.write_text(json.dumps(meta, indent=2, sort_keys=True))
    return folder
