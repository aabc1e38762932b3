"""JSON Schema (draft 2020-12) of ``results.json``; prose version in ``docs/results_schema.md``."""
from __future__ import annotations

_NUM = {"type": ["number", "null"]}
_INT = {"type": ["integer", "null"]}
_METRICS4 = {
    "type": "object",
    "required": ["dM_row", "dM_col", "dD_row", "dD_col"],
    "properties": {k: {"type": "array", "items": {"type": ["number", "null"]}}
                   for k in ("dM_row", "dM_col", "dD_row", "dD_col")},
}
_MEAN4 = {"type": "object", "required": ["dM_row", "dM_col", "dD_row", "dD_col"],
          "properties": {k: _NUM for k in ("dM_row", "dM_col", "dD_row", "dD_col")}}

RUN_SCHEMA = {
    "type": "object",
    "required": ["run_id", "method", "rank", "status", "trainable_params", "total_params", "history", "eval",
                 "analysis", "median_step_s", "peak_mem_mb", "summary", "analysed_modules"],
    "properties": {
        "run_id": {"type": "string"},
        "method": {"type": "string"},
        "rank": {"type": "integer"},
        "status": {"enum": ["pending", "running", "done", "nan", "diverged", "oom", "error", "cancelled",
                            "interrupted"]},
        "error": {"type": ["string", "null"]},
        "trainable_params": _INT,
        "total_params": _INT,
        "trainable_pct": _NUM,
        "adapter": {"type": "object", "required": ["step", "saved"],
                    "properties": {"step": {"type": "integer"}, "saved": {"type": "boolean"},
                                   "reason": {"type": ["string", "null"]}}},
        "adapter_params": _INT,
        "head_params": _INT,
        "magnitude_axis": {"type": ["string", "null"]},
        "device": {"type": ["string", "null"]},
        "analysed_modules": {"type": "array", "items": {"type": "string"}},
        "history": {"type": "array", "items": {
            "type": "object", "required": ["step", "loss", "lr", "step_s", "peak_mem_mb"],
            "properties": {"step": {"type": "integer"}, "loss": _NUM, "lr": _NUM, "step_s": _NUM, "peak_mem_mb": _NUM}}},
        "eval": {"type": "array", "items": {
            "type": "object", "required": ["step", "metrics"],
            "properties": {"step": {"type": "integer"},
                           "metrics": {"type": "object", "additionalProperties": _NUM}}}},
        "analysis": {"type": "array", "items": {
            "type": "object", "required": ["step", "prev_step", "modules", "from_start", "step_to_step", "mean"],
            "properties": {
                "step": {"type": "integer"}, "prev_step": _INT, "cost_s": _NUM,
                "modules": {"type": "array", "items": {"type": "string"}},
                "from_start": _METRICS4, "step_to_step": _METRICS4,
                "mean": {"type": "object", "required": ["from_start", "step_to_step"],
                         "properties": {"from_start": _MEAN4, "step_to_step": _MEAN4}}}}},
        "median_step_s": _NUM,
        "peak_mem_mb": _NUM,
        "summary": {"type": "object"},
    },
}

RESULTS_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "BoRA Lab results.json",
    "type": "object",
    "required": ["schema_version", "created", "status", "config", "task", "device", "peak_mem_kind", "runs"],
    "properties": {
        "schema_version": {"enum": [1, 2]},
        "created": {"type": "string"},
        "status": {"enum": ["running", "done", "cancelled", "interrupted", "error"]},
        "message": {"type": ["string", "null"]},
        "config": {"type": "object", "required": ["task", "model", "methods", "ranks", "steps", "seed"]},
        "task": {"type": "object"},
        "device": {"type": ["string", "null"]},
        "peak_mem_kind": {"enum": ["cuda_max_memory_allocated", "process_peak_rss", None]},
        "lockstep": {"type": "boolean"},
        "elapsed_s": _NUM,
        "num_threads": _INT,
        "environment": {"type": "object", "required": ["bora_lab", "python", "packages", "device", "device_name"],
                        "properties": {"bora_lab": {"type": "string"}, "python": {"type": "string"},
                                       "git": {"type": ["object", "null"]},
                                       "packages": {"type": "object",
                                                    "additionalProperties": {"type": ["string", "null"]}},
                                       "device": {"type": "string"}, "device_name": {"type": "string"},
                                       "num_threads": _INT}},
        "progress": {"type": ["object", "null"]},
        "runs": {"type": "array", "items": RUN_SCHEMA},
    },
}
