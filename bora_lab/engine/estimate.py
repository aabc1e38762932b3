"""What a comparison will cost before it trains: the number of runs and an estimate of the time.

The estimate scales the measured step time of each method on the default model
(``bora_lab/data/step_times.json``, written by ``benchmarks/step_times.py`` on a 2-core CPU) by the
tokens per step and the layers kept, and adds the evaluations. It is given for the offline MiniLM on
a CPU only; any other model or a GPU gets the run count and "no estimate" (the live ETA appears after
the first steps).
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..config import RunConfig

TABLE = Path(__file__).resolve().parents[1] / "data" / "step_times.json"


@lru_cache(maxsize=1)
def _table() -> dict[str, Any] | None:
    try:
        return json.loads(TABLE.read_text())
    except (OSError, ValueError):
        return None


def estimate(cfg: RunConfig, device: str = "cpu") -> dict[str, Any]:
    """``{"runs", "steps", "seconds" (None when there is no estimate), "why"}`` for ``cfg``."""
    plan = cfg.run_plan()
    out: dict[str, Any] = {"runs": len(plan), "steps": len(plan) * cfg.steps, "seconds": None, "why": ""}
    table = _table()
    if table is None:
        out["why"] = "no step-time table"
        return out
    if cfg.model != table["model"] or device not in ("cpu", "auto"):
        out["why"] = f"step times are measured for {table['model']} on a CPU only"
        return out
    scale = (cfg.batch_size * cfg.max_length) / (table["batch_size"] * table["max_length"])
    scale *= min(cfg.num_layers or table["num_layers"], table["num_layers"]) / table["num_layers"]
    lora = table["step_s"].get("lora") or 0.25
    evals = math.ceil(cfg.steps / cfg.eval_every) + (cfg.steps % cfg.eval_every != 0)
    per_eval = (cfg.eval_samples or 1000) + cfg.val_samples
    seconds = 0.0
    for _, method, *_ in plan:
        seconds += cfg.steps * (table["step_s"].get(method) or lora) * scale
        seconds += evals * per_eval * table["eval_s_per_example"] * min(1.0, scale * 4)
    out["seconds"] = seconds
    out["why"] = f"from step times measured on {table['cpu']} ({table['threads']} threads)"
    return out


def cost_text(cfg: RunConfig, device: str = "cpu") -> str:
    """One line for people: ``"9 runs x 150 steps: about 7 min (from step times measured on ...)"``."""
    e = estimate(cfg, device)
    head = f"{e['runs']} run{'s' * (e['runs'] != 1)} × {cfg.steps:,} steps"
    if e["seconds"] is None:
        return f"{head}: no time estimate ({e['why']})"
    s = e["seconds"]
    when = f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"
    return f"{head}: about {when} on a 2-core CPU ({e['why']})"


def matched_preview(cfg: RunConfig) -> str:
    """With ``match_params`` on the offline MiniLM: the matched ranks and counts, from a weightless
    (meta-device) copy of the model, so they show before anything loads or trains; else ``""``."""
    if not cfg.match_params or cfg.model != "minilm":
        return ""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .. import methods
    from .loading import _minilm_folder, configure_model

    config = AutoConfig.from_pretrained(_minilm_folder())
    configure_model(config, "minilm", "classification", 2, cfg.num_layers)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    m = methods.matching.match_ranks(model, cfg.methods, cfg.match_params, cfg.ranks, cfg.alpha, cfg.target_modules,
                                     cfg.method_options)
    parts = [f"{r['method']} r{r['rank']} ({r['params']:,})" for r in m["table"]]
    refs = ", ".join(f"r{r}: {c:,}" for r, c in dict((r["reference_rank"], r["reference_params"])
                                                    for r in m["table"]).items())
    return f"matched to {m['reference']} ({refs} adapter parameters): " + ", ".join(parts)
