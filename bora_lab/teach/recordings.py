"""Recorded lessons: a built-in lesson's run, trained once and shipped, to replay without training.

A recording is one gzip JSON file, ``bora_lab/teach/lessons/recordings/<lesson id>.json.gz``
(written by ``scripts/record_lessons.py``, which calls :func:`record`)::

    {"recording_version": 1, "schema_version": 2,       # this format; the results.json schema
     "lesson_id": "mora-high-rank", "view": "inside", "settings": {...},
     "settings_hash": "<sha256 of the lesson's settings, canonical JSON>",
     "created": "...", "elapsed_s": 118.4, "environment": {"torch": ..., "transformers": ..., "machine": ...},
     "results": {...},                                  # the whole results dict (results.json)
     "layers": {run_id: {"modules": [name], "w0": {module: key},
                         "checkpoints": [{"step": 0, "delta": {module: key}}, ...],   # the kept ones
                         "info": [{"step": 0, "modules": {module: inspect()}}, ...]}}, # every checkpoint
     "arrays": {key: {"dtype": "int8", "shape": [out, in], "scale": 1.2e-5, "data": "<base64>"}}}

Only lessons whose view is ``"inside"`` keep matrices: ``W0`` and ``ΔW`` of the first analysed module
at step 0, one middle and the last checkpoint, float16 when the file stays under :data:`MAX_BYTES`
(else fewer checkpoints, then int8 with one scale per tensor: ``x ≈ q·scale``, ``scale = max|x| / 127``).
Identical arrays (the same ``W0`` in every run, the zero ``ΔW`` of step 0) are stored once.

    rec = load_recording("mora-high-rank")     # None if not recorded; rec["stale"] if out of date
    store = layer_store_from(rec)              # what the "Inside a layer" view reads
    for partial in replay_frames(rec, 60):     # the curves growing as if live
        ...
"""
from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import json
import os
import platform
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bora_lab.record import SCHEMA_VERSION, LayerStore, ResultsAccumulator
from bora_lab.record.accumulator import summarize
from bora_lab.record.layer_store import json_safe

from . import lessons as L

RECORDING_VERSION = 1
RECORDING_DIR = L.LESSON_DIR / "recordings"
SUFFIX = ".json.gz"
MAX_BYTES = 2 * 1024 * 1024  # one recording, compressed
MAX_UNPACKED = 64 * 1024 * 1024  # refuse a file that inflates beyond this
KEEP_MODULES = 1  # analysed modules whose matrices are kept (the first ones)
# (matrix dtype, checkpoints kept) from the most faithful down: the first whose file fits MAX_BYTES wins.
# float16 first even at fewer checkpoints: int8's rounding (up to max|ΔW|/254 per element) lifts the
# spectrum's tail to ~1e-3·σ₁ and so roughly doubled a rank-4 LoRA's effective rank (3.9 -> 7.3).
ENCODINGS = (("float16", 3), ("float16", 2), ("int8", 3), ("int8", 2))
_AGGREGATES = ("aggregate", "aggregate_best", "aggregate_tuned")  # computed when a comparison finishes
_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class RecordingError(ValueError):
    """A recording that cannot be made or read; the message says why."""


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------
def settings_hash(lesson: dict[str, Any]) -> str:
    """sha256 (hex) of the lesson's ``settings`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(lesson["settings"], sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def recording_path(lesson_id: str, directory: str | Path | None = None) -> Path:
    """``<directory>/<lesson_id>.json.gz`` (default directory :data:`RECORDING_DIR`).

    Raises:
        RecordingError: ``lesson_id`` is not a lesson id (so never a path outside the directory).
    """
    if not isinstance(lesson_id, str) or not _ID.match(lesson_id):
        raise RecordingError(f"{lesson_id!r} is not a lesson id (1-64 lowercase letters, digits, '-' or '_')")
    return Path(directory or RECORDING_DIR) / f"{lesson_id}{SUFFIX}"


# ---------------------------------------------------------------------------------------------
# Arrays: float16 or int8 with one scale per tensor, base64 in the JSON
# ---------------------------------------------------------------------------------------------
def encode_array(a: np.ndarray, dtype: str = "int8") -> dict[str, Any]:
    """A JSON-ready ``{"dtype", "shape", "data"[, "scale"]}`` of ``a``.

    ``int8``: ``q = round(a / scale)`` with ``scale = max|a| / 127``, so each element is off by at most
    ``scale / 2`` (``scale = 0`` for an all-zero array). ``float16``: the values as float16.
    """
    x = np.asarray(a, dtype=np.float32)
    out: dict[str, Any] = {"dtype": dtype, "shape": list(x.shape)}
    if dtype == "int8":
        peak = float(np.abs(x).max()) if x.size else 0.0
        scale = peak / 127.0
        q = np.zeros(x.shape, np.int8) if scale == 0.0 else np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
        out["scale"], raw = scale, q.tobytes()
    elif dtype == "float16":
        raw = x.astype("<f2").tobytes()
    else:
        raise RecordingError(f"unknown array dtype {dtype!r}; use int8 or float16")
    out["data"] = base64.b64encode(raw).decode("ascii")
    return out


def decode_array(d: dict[str, Any]) -> np.ndarray:
    """The float16 array of :func:`encode_array`'s dict (int8 dequantised: ``q·scale``)."""
    raw, shape = base64.b64decode(d["data"]), tuple(d["shape"])
    if d["dtype"] == "int8":
        q = np.frombuffer(raw, np.int8).reshape(shape)
        return (q.astype(np.float32) * np.float32(d["scale"])).astype(np.float16)
    if d["dtype"] == "float16":
        return np.frombuffer(raw, "<f2").reshape(shape).astype(np.float16)
    raise RecordingError(f"unknown array dtype {d['dtype']!r} in a recording")


def _kept_steps(steps: list[int], n: int) -> list[int]:
    """``n`` of the checkpointed steps, evenly spread: the first (step 0) and the last always."""
    if n >= len(steps) or n <= 1:
        return list(steps) if n > 1 else steps[-1:]
    return sorted({steps[round(i * (len(steps) - 1) / (n - 1))] for i in range(n)})


def _layers(store: LayerStore, dtype: str, checkpoints: int, modules: int) -> tuple[dict, dict]:
    """``(layers, arrays)`` of a recording: each run's first ``modules`` modules, ``checkpoints`` steps."""
    layers: dict[str, Any] = {}
    arrays: dict[str, dict[str, Any]] = {}

    def put(a: np.ndarray) -> str:
        a = np.ascontiguousarray(a, dtype=np.float16)
        key = hashlib.sha256(f"{dtype}{a.shape}".encode() + a.tobytes()).hexdigest()[:16]
        if key not in arrays:
            arrays[key] = encode_array(a, dtype)
        return key

    for run_id in store.run_ids():
        steps, mods = store.steps(run_id), store.modules(run_id)[:modules]
        layers[run_id] = {
            "modules": mods,
            "w0": {m: put(store.w0(run_id, m)) for m in mods},
            "checkpoints": [{"step": s, "delta": {m: put(store.delta(run_id, s, m)) for m in mods}}
                            for s in _kept_steps(steps, checkpoints)],
            "info": [{"step": s, "modules": {m: store.info(run_id, s, m) for m in mods}} for s in steps],
        }
    return layers, arrays


# ---------------------------------------------------------------------------------------------
# Making a recording
# ---------------------------------------------------------------------------------------------
def _environment(results: dict[str, Any]) -> dict[str, Any]:
    env = results.get("environment") or {}
    packages = env.get("packages") or {}
    return {"torch": packages.get("torch"), "transformers": packages.get("transformers"),
            "machine": platform.machine(), "device": results.get("device"), "device_name": env.get("device_name"),
            "num_threads": results.get("num_threads"), "python": env.get("python") or platform.python_version(),
            "platform": env.get("platform") or platform.platform(), "bora_lab": env.get("bora_lab"),
            "git": env.get("git")}


def build_recording(lesson: dict[str, Any], results: dict[str, Any], store: LayerStore | None = None,
                    elapsed_s: float | None = None, dtype: str = "int8", checkpoints: int = 3,
                    modules: int = KEEP_MODULES) -> dict[str, Any]:
    """The recording dict of a finished comparison (no training here; :func:`record` trains).

    Args:
        lesson: the validated lesson that was run.
        results: its results dict (``ResultsAccumulator.results``).
        store: its layer checkpoints; None (or empty) keeps no matrices.
        elapsed_s: training time in seconds.
        dtype, checkpoints, modules: how matrices are kept (see :data:`ENCODINGS`).
    """
    layers, arrays = _layers(store, dtype, checkpoints, modules) if store else ({}, {})
    return {"recording_version": RECORDING_VERSION, "schema_version": results.get("schema_version", SCHEMA_VERSION),
            "lesson_id": lesson["id"], "title": lesson["title"], "view": lesson["view"],
            "settings": lesson["settings"], "settings_hash": settings_hash(lesson),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "elapsed_s": elapsed_s,
            "environment": _environment(results), "results": json_safe(results),
            "layers": json_safe(layers), "arrays": arrays}


def pack(recording: dict[str, Any]) -> bytes:
    """The gzip JSON bytes of a recording (reproducible: no file name or time in the gzip header)."""
    text = json.dumps(recording, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def pack_within(lesson: dict[str, Any], results: dict[str, Any], store: LayerStore | None,
                elapsed_s: float | None = None, max_bytes: int = MAX_BYTES) -> tuple[bytes, tuple[str, int]]:
    """The packed recording, matrices kept along :data:`ENCODINGS` until the file fits ``max_bytes``.

    Returns:
        ``(bytes, (dtype, checkpoints))`` of the first encoding that fits.

    Raises:
        RecordingError: none fits (the message lists each encoding's size).
    """
    sizes = []
    for dtype, n in ENCODINGS if store else (("int8", 0),):
        data = pack(build_recording(lesson, results, store, elapsed_s, dtype, n))
        if len(data) <= max_bytes:
            return data, (dtype, n)
        sizes.append(f"{dtype} x{n}: {len(data):,} B")
    raise RecordingError(f"{lesson['id']}: the recording exceeds {max_bytes:,} bytes ({'; '.join(sizes)})")


def record(lesson: dict[str, Any] | str | Path, out_dir: str | Path | None = None, *,
           matrices: bool | None = None, max_bytes: int = MAX_BYTES,
           on_event: Callable[[Any], None] | None = None, cancel: Any = None) -> Path:
    """Train a lesson's configuration (``lesson_config(lesson)``) and write its recording.

    Args:
        lesson: a lesson dict, file or JSON text (validated).
        out_dir: where to write ``<lesson id>.json.gz`` (default :data:`RECORDING_DIR`).
        matrices: keep layer matrices; default: only when the lesson's view is ``"inside"``.
        max_bytes: the file must stay under this; matrices are downsampled along :data:`ENCODINGS`.
        on_event: called with every training event (progress printing).
        cancel: a ``threading.Event`` that stops the training (nothing is written then).

    Returns:
        The path written.

    Raises:
        RecordingError: a method the lesson names is not available here, the comparison did not
            finish, or no encoding fits ``max_bytes``.
    """
    from bora_lab.engine.trainer import compare  # torch: only when a recording is made

    lesson = L.load_lesson(lesson)
    missing = L.missing_methods(lesson)
    if missing:
        raise RecordingError(f"{lesson['id']}: method(s) {', '.join(missing)} not available here; "
                             "a recording must run every method of the lesson")
    cfg = L.lesson_config(lesson)
    acc = ResultsAccumulator(cfg)
    t0 = time.perf_counter()
    for ev in compare(cfg, cancel):
        acc.update(ev)
        if on_event is not None:
            on_event(ev)
    elapsed = time.perf_counter() - t0
    if acc.results["status"] != "done":
        raise RecordingError(f"{lesson['id']}: the comparison ended '{acc.results['status']}'; nothing written")
    keep = lesson["view"] == "inside" if matrices is None else matrices
    data, _ = pack_within(lesson, acc.results, acc.layers if keep else None, elapsed, max_bytes)
    path = recording_path(lesson["id"], out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # renamed into place: never a half-written file
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def read_recording(path: str | Path) -> dict[str, Any]:
    """The recording dict stored in ``path``, as written (no staleness check).

    Raises:
        RecordingError: not a gzip JSON lesson recording.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read(MAX_UNPACKED + 1)
        if len(raw) > MAX_UNPACKED:
            raise RecordingError(f"{path.name}: inflates beyond {MAX_UNPACKED // 2**20} MB")
        rec = json.loads(raw.decode("utf-8"))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordingError(f"{path.name}: not a readable lesson recording ({err})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("results"), dict) or "runs" not in rec["results"]:
        raise RecordingError(f"{path.name}: not a BoRA Lab lesson recording")
    return rec


def stale_reasons(recording: dict[str, Any], lesson: dict[str, Any] | None) -> list[str]:
    """Why ``recording`` no longer shows ``lesson`` as it is now ([] when it is current)."""
    reasons = []
    if recording.get("recording_version") != RECORDING_VERSION:
        reasons.append(f"recording version {recording.get('recording_version')} (this BoRA Lab writes "
                       f"{RECORDING_VERSION})")
    if recording.get("schema_version") != SCHEMA_VERSION:
        reasons.append(f"results schema version {recording.get('schema_version')} (now {SCHEMA_VERSION})")
    if lesson is None:
        reasons.append(f"no built-in lesson '{recording.get('lesson_id')}' any more")
    elif recording.get("settings_hash") != settings_hash(lesson):
        reasons.append("the lesson's settings changed since it was recorded")
    return reasons


def load_recording(lesson_id: str | dict[str, Any], directory: str | Path | None = None) -> dict[str, Any] | None:
    """The recording of a lesson, or None if it has none.

    Args:
        lesson_id: a built-in lesson's id, or a lesson dict (checked against that lesson's settings).
        directory: where recordings are (default :data:`RECORDING_DIR`).

    Returns:
        The recording dict plus ``"stale"`` (True when the lesson's settings hash, the results schema
        version or the recording version differ from the recording's) and ``"stale_reasons"``.

    Raises:
        RecordingError: the file exists but is damaged.
    """
    lesson = lesson_id if isinstance(lesson_id, dict) else L.get_lesson(lesson_id)
    path = recording_path(lesson["id"] if isinstance(lesson_id, dict) else lesson_id, directory)
    if not path.is_file():
        return None
    rec = read_recording(path)
    reasons = stale_reasons(rec, lesson)
    return {**rec, "stale": bool(reasons), "stale_reasons": reasons}


def layer_store_from(recording: dict[str, Any]) -> LayerStore:
    """An in-memory ``LayerStore`` of the recording's matrices (dequantised, float16) with the
    ``inspect()`` of each kept step: what the "Inside a layer" view reads. Empty without matrices."""
    arrays = recording.get("arrays") or {}
    cache: dict[str, np.ndarray] = {}

    def get(key: str) -> np.ndarray:
        if key not in cache:
            cache[key] = decode_array(arrays[key])
            cache[key].setflags(write=False)  # shared between runs and steps
        return cache[key]

    store = LayerStore()
    for run_id, part in (recording.get("layers") or {}).items():
        infos = {int(i["step"]): i["modules"] for i in part.get("info", [])}
        for k, ckpt in enumerate(part.get("checkpoints", [])):
            step = int(ckpt["step"])
            store.add(run_id, step, {m: get(key) for m, key in ckpt["delta"].items()}, infos.get(step, {}),
                      w0={m: get(key) for m, key in part["w0"].items()} if k == 0 else None)
    return store


# ---------------------------------------------------------------------------------------------
# Replay
# ---------------------------------------------------------------------------------------------
def _run_at(run: dict[str, Any], t: int, task: dict[str, Any]) -> dict[str, Any]:
    """The run's entry as it stood live after step ``t`` (the final entry once ``t`` reaches its end)."""
    hist = run.get("history") or []
    if t >= (hist[-1]["step"] if hist else 0):
        return run
    entry = {k: v for k, v in run.items() if k not in ("adapter", "best", "per_example", "per_example_best")}
    entry.update(status="running", error=None, history=[h for h in hist if h["step"] <= t],
                 eval=[e for e in run.get("eval", []) if e["step"] <= t],
                 analysis=[a for a in run.get("analysis", []) if a["step"] <= t])
    for key in ("per_example", "best"):
        if (run.get(key) or {}).get("step", t + 1) <= t:
            entry[key] = run[key]
    if "best" in entry and "per_example_best" in run:
        entry["per_example_best"] = run["per_example_best"]
    mems = [h["peak_mem_mb"] for h in entry["history"] if h.get("peak_mem_mb") is not None]
    entry["peak_mem_mb"] = max(mems) if mems else None
    entry["summary"] = summarize(entry, task, status="running")
    entry["median_step_s"] = entry["summary"].get("median_step_s")
    return entry


def replay_frames(recording: dict[str, Any], n_frames: int) -> Iterator[dict[str, Any]]:
    """Partial results dicts that grow the recorded curves as if the comparison were running.

    Frame ``i`` (of at most ``n_frames``; fewer when the runs have fewer steps) holds, for every run,
    the history, eval and analysis entries up to step ``t_i = round(i·T / n_frames)`` (``T`` = the last
    recorded step), a partial summary and status ``"running"``; a run whose record ends by ``t_i``
    appears complete. The last frame is a copy of the recording's results. Frames share their rows
    with the recording: treat them as read-only.

    Raises:
        ValueError: ``n_frames < 1``.
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be at least 1, got {n_frames}")
    results = recording["results"]
    runs = results.get("runs", [])
    last = max((r["history"][-1]["step"] for r in runs if r.get("history")), default=0)
    total = sum(len(r.get("history") or []) for r in runs)
    elapsed = results.get("elapsed_s") or 0.0
    task = results.get("task") or {}
    for t in sorted({round(i * last / n_frames) for i in range(1, n_frames)} - {0, last}):
        frame = {k: v for k, v in results.items() if k not in _AGGREGATES and k != "elapsed_s"}
        frame["runs"] = [_run_at(r, t, task) for r in runs]
        done = sum(len(r["history"]) for r in frame["runs"])
        frame.update(status="running", message=None,
                     progress={"done_steps": done, "total_steps": total, "elapsed_s": elapsed * done / max(total, 1),
                               "eta_s": elapsed * (total - done) / max(total, 1)})
        yield frame
    yield copy.deepcopy(results)
