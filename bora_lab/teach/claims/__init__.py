"""Paper claims, checked: each finding of the source papers as an experiment on models we can run.

A claim is data, one small JSON file in ``catalogue/`` (schema below): the paper, where in it, the
claim in one sentence, the paper's numbers, and the experiment that tests it. :func:`reproduce` runs
the experiment and returns a *record*: our value for each row with its 95% interval over seeds (or
the exact value for counting claims), next to the paper's, and a verdict in words. The last record
of each claim is kept in ``records/`` (written by ``bora-lab reproduce CLAIM --save``), so the app's
"Paper claims" view opens at once; a record says which catalogue entry it was made from (a hash of
the experiment), so a changed experiment shows its record as out of date.

    from bora_lab.teach import claims
    claims.catalogue()[0]["id"]                 # "bora-asymmetry"
    rec = claims.reproduce("bora-param-percent")  # seconds: counted on the meta device
    rec["verdict"], rec["rows"][0]              # "reproduced", {"label": "LoRA r=64 (table 1)", ...}

Catalogue entry fields: ``schema_version`` (1), ``id``, ``order``, ``title``, ``paper`` (``authors``,
``year``, ``title``, ``arxiv``), ``where`` (section, figure/table), ``claim`` (one sentence),
``paper_value`` (``text``, ``rows``), ``experiment`` (``kind``: one of :data:`KINDS`, and its
parameters), optional ``axis_note``.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CATALOGUE_DIR, RECORDS_DIR = HERE / "catalogue", HERE / "records"
SCHEMA_VERSION = 1
VERDICTS = ("reproduced", "partly reproduced", "not reproduced at this scale", "not reproduced", "opposite")
COUNTING = ("param_percent", "adapter_count", "sensitivity_share", "memory")  # exact, seconds, no training
TRAINING = ("asymmetry", "slopes", "difference", "step_time", "update_rank")  # train a comparison with seeds
KINDS = COUNTING + TRAINING
REQUIRED = {"schema_version": int, "id": str, "order": int, "title": str, "paper": dict, "where": str,
            "claim": str, "paper_value": dict, "experiment": dict}


class ClaimError(ValueError):
    """A catalogue entry or a request that does not fit the schema; the message names the field."""


def validate_claim(data: Any) -> dict[str, Any]:
    """``data`` if it is a valid catalogue entry.

    Raises:
        ClaimError: the first problem found, naming the field.
    """
    if not isinstance(data, dict):
        raise ClaimError(f"a claim must be a JSON object, got {type(data).__name__}")
    for name, kind in REQUIRED.items():
        if name not in data:
            raise ClaimError(f"claim field {name!r} is missing")
        if not isinstance(data[name], kind) or isinstance(data[name], bool):
            raise ClaimError(f"claim field {name!r} must be {kind.__name__}, got {type(data[name]).__name__}")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ClaimError(f"claim {data['id']!r}: schema_version {data['schema_version']} (this code reads {SCHEMA_VERSION})")
    for name in ("authors", "year", "title", "arxiv"):
        if name not in data["paper"]:
            raise ClaimError(f"claim {data['id']!r}: field 'paper.{name}' is missing")
    if not isinstance(data["paper_value"].get("text"), str):
        raise ClaimError(f"claim {data['id']!r}: field 'paper_value.text' must be a string")
    exp = data["experiment"]
    if exp.get("kind") not in KINDS:
        raise ClaimError(f"claim {data['id']!r}: 'experiment.kind' must be one of {', '.join(KINDS)}, got {exp.get('kind')!r}")
    if exp["kind"] in TRAINING:
        from bora_lab.config import RunConfig

        if not isinstance(exp.get("settings"), dict) or not isinstance(exp.get("seeds"), list) or not exp["seeds"]:
            raise ClaimError(f"claim {data['id']!r}: a training experiment needs 'settings' and a list of 'seeds'")
        try:
            RunConfig(**{**exp["settings"], "seeds": exp["seeds"]})
        except (TypeError, ValueError) as err:
            raise ClaimError(f"claim {data['id']!r}: 'experiment.settings' is not a valid comparison: {err}") from None
    elif exp["kind"] in ("param_percent", "adapter_count"):
        rows = exp.get("rows")
        if not isinstance(rows, list) or not rows or not all({"label", "method", "rank", "paper"} <= set(r) for r in rows):
            raise ClaimError(f"claim {data['id']!r}: 'experiment.rows' must list {{label, method, rank, paper}}")
    return data


def catalogue() -> list[dict[str, Any]]:
    """Every claim of ``catalogue/``, validated, in their ``order``."""
    out = [validate_claim(json.loads(p.read_text(encoding="utf-8"))) for p in sorted(CATALOGUE_DIR.glob("*.json"))]
    ids = [c["id"] for c in out]
    if len(ids) != len(set(ids)):
        raise ClaimError(f"claim ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
    return sorted(out, key=lambda c: c["order"])


def get_claim(claim_id: str) -> dict[str, Any]:
    """The catalogue entry ``claim_id``. Raises ClaimError naming the known ids."""
    for c in catalogue():
        if c["id"] == claim_id:
            return c
    raise ClaimError(f"unknown claim {claim_id!r}; claims: {', '.join(c['id'] for c in catalogue())}")


def claim_hash(claim: dict[str, Any]) -> str:
    """A short hash of what the record depends on: the experiment and the paper's numbers."""
    text = json.dumps({"experiment": claim["experiment"], "paper_value": claim["paper_value"]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def paper_cite(claim: dict[str, Any]) -> str:
    """``"Wang et al. 2024, BoRA: ... (arXiv:2412.06441), section 4.4.1, table 3"``."""
    p = claim["paper"]
    first = p["authors"].split(",")[0].strip()
    who = f"{first} et al." if "," in p["authors"] else first
    arxiv = f" (arXiv:{p['arxiv']})" if p.get("arxiv") else ""
    year = f" {p['year']}" if p.get("year") else ""
    return f"{who}{year}, {p['title']}{arxiv}, {claim['where']}"


def record_of(claim_id: str) -> dict[str, Any] | None:
    """The recorded result of ``claim_id`` with ``"stale": True`` when its catalogue entry changed since; None if none."""
    path = RECORDS_DIR / f"{claim_id}.json"
    if not path.is_file():
        return None
    rec = json.loads(path.read_text(encoding="utf-8"))
    try:
        rec["stale"] = rec.get("claim_hash") != claim_hash(get_claim(claim_id))
    except ClaimError:
        rec["stale"] = True
    return rec


def save_record(record: dict[str, Any], folder: str | Path | None = None) -> Path:
    """Write ``record`` as ``<folder>/<claim id>.json`` (default: the package's ``records/``)."""
    folder = Path(folder) if folder else RECORDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record['claim']}.json"
    body = {k: v for k, v in record.items() if k != "stale"}
    path.write_text(json.dumps(body, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def reproduce(claim_id: str, *, seeds: list[int] | None = None, overrides: dict[str, Any] | None = None,
              cancel: threading.Event | None = None, on_event: Callable[[Any], None] | None = None,
              out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the experiment of ``claim_id`` and return its record.

    Args:
        seeds: replace the claim's seeds (training claims); more seeds, narrower intervals.
        overrides: RunConfig fields laid over the claim's settings (e.g. ``{"steps": 300}``): the record
            states the budget it used, so a record made with overrides says so.
        cancel, on_event: as in ``bora_lab.engine.trainer.run`` (progress of a training claim).
        out_dir: keep the comparison's run folder there (training claims).

    Returns:
        ``{"claim", "claim_hash", "title", "cite", "kind", "rows": [{"label", "paper", "ours", "unit",
        "verdict"}], "verdict", "explanation", "budget", "seeds", "elapsed_s", "created", "environment"}``.
    """
    import time

    from . import counting, training

    claim = get_claim(claim_id)
    kind = claim["experiment"]["kind"]
    t0 = time.perf_counter()
    if kind in COUNTING:
        if overrides or seeds:
            raise ClaimError(f"claim {claim_id!r} is counted exactly: it takes no seeds or settings")
        body = counting.run(claim)
    else:
        body = training.run(claim, seeds=seeds, overrides=overrides or {}, cancel=cancel, on_event=on_event,
                            out_dir=out_dir)
    if body["verdict"] not in VERDICTS:
        raise AssertionError(f"verdict {body['verdict']!r} is not one of {VERDICTS}")
    return {"schema_version": SCHEMA_VERSION, "claim": claim_id, "claim_hash": claim_hash(claim),
            "title": claim["title"], "cite": paper_cite(claim), "kind": kind, **body,
            "elapsed_s": round(time.perf_counter() - t0, 1), "created": time.strftime("%Y-%m-%d"),
            "environment": _environment()}


def combine(verdicts: list[str]) -> str:
    """One verdict from the verdicts of a claim's parts: all agree -> that; a mix with at least one
    reproduced part -> "partly reproduced"; else "opposite" if any part is, else "not reproduced at this scale"."""
    if verdicts and all(v == verdicts[0] for v in verdicts):
        return verdicts[0]
    if "reproduced" in verdicts:
        return "partly reproduced"
    return "opposite" if "opposite" in verdicts else "not reproduced at this scale"


def _environment() -> dict[str, Any]:
    import platform

    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
