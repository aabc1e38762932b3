"""Lessons: a teacher's preset (RunConfig settings) plus the text around it, as a small JSON file.

A lesson is **data only**: it is parsed with ``json.loads`` and checked field by field against the
schema below (and ``RunConfig``'s own checks); nothing in it is ever executed or imported::

    {
      "id": "lora-couples",                 # lowercase letters, digits, '-' and '_' (the ?lesson= value)
      "title": "LoRA couples magnitude and direction",
      "summary": "what the lesson is about",
      "predict": "what students predict before pressing Run",
      "look_for": "what to look for after the run",
      "settings": {"methods": ["lora", "dora"], "steps": 120, ...},   # a subset of RunConfig fields
      "view": "scatter",                    # one of VIEWS: where to look
      "observed": "optional: what the teacher saw (numbers)",
      "schema_version": 1                   # optional
    }

Methods that are not registered in this installation are allowed (the lesson still validates);
:func:`missing_methods` names them and :func:`lesson_config` leaves them out.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

from bora_lab.config import RunConfig, lr_choice

SCHEMA_VERSION = 1
LESSON_DIR = Path(__file__).with_name("lessons")
MAX_BYTES = 64 * 1024  # a lesson is a few KB; refuse anything big before parsing it
MAX_TEXT = 5000
REQUIRED = ("id", "title", "summary", "predict", "look_for", "settings", "view")
OPTIONAL = ("observed", "schema_version", "translations")
LOCALES = ("zh-CN", "zh-TW")  # the languages a lesson's texts may come in besides English
TEXT_FIELDS = ("title", "summary", "predict", "look_for", "observed")
VIEWS: dict[str, str] = {  # where to look after the run (shown as "look at <text>")
    "loss": "the training-loss plot (Compare tab)",
    "metric": "the evaluation-metric plot (Compare tab)",
    "md": "the ΔM / ΔD plot, row-wise and column-wise (Compare tab; BoRA figures 2 and 3)",
    "scatter": "the DoRA figure 2 plot, ΔM vs ΔD per layer and checkpoint (Compare tab)",
    "table": "the results table (Compare tab)",
    "forest": "the forest plot: each method's difference from the baseline with its 95% interval (Compare tab)",
    "inside": "the Inside a layer tab (W0, ΔW, row/column norms, singular values of ΔW)",
    "cards": "the Method cards tab",
    "memory": "the Memory tab (estimate next to the measured peak)",
}
_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_METHOD = re.compile(r"^[a-z][a-z0-9_]*$")
_RUN_TYPES: dict[str, str] = {f.name: str(f.type) for f in dataclasses.fields(RunConfig)}


class LessonError(ValueError):
    """A lesson that cannot be used; the message names the field and what is wrong with it."""


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_type(value: Any, type_str: str, where: str) -> None:
    """Check one JSON value against a dataclass type string (``"int"``, ``"list[str] | None"``...)."""
    t = type_str.replace(" ", "")
    if t.endswith("|None"):
        if value is None:
            return
        t = t[: -len("|None")]
    if t == "bool":
        ok, want = isinstance(value, bool), "true or false"
    elif t == "int":
        ok, want = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif t == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        want = "a finite number"
    elif t == "str":
        ok, want = isinstance(value, str) and len(value) <= MAX_TEXT, f"a string (at most {MAX_TEXT} characters)"
    elif t.startswith("list[") and t.endswith("]"):
        if not isinstance(value, list):
            raise LessonError(f"lesson field '{where}' must be a list, got {_kind(value)} {value!r}")
        for i, item in enumerate(value):
            _check_type(item, t[5:-1], f"{where}[{i}]")
        return
    elif t.startswith("dict["):  # method_options: {"dora": {"detach_norm": false}}, plain values only
        if not isinstance(value, dict):
            raise LessonError(f"lesson field '{where}' must be an object, got {_kind(value)} {value!r}")
        nested = t.startswith("dict[str,dict[")
        for k, v in value.items():
            inner = v.values() if isinstance(v, dict) else [v]
            if (nested and not isinstance(v, dict)) or any(isinstance(x, (dict, list)) for x in inner):
                raise LessonError(f"lesson field '{where}.{k}' must be an object of plain values, got {v!r}")
        return
    else:  # a RunConfig field type this checker does not know: accept plain JSON values
        ok, want = True, ""
    if not ok:
        raise LessonError(f"lesson field '{where}' must be {want}, got {_kind(value)} {value!r}")


def _check_settings(settings: Any) -> None:
    if not isinstance(settings, dict):
        raise LessonError(f"lesson field 'settings' must be an object of RunConfig fields, got {_kind(settings)}")
    unknown = sorted(set(settings) - set(_RUN_TYPES))
    if unknown:
        raise LessonError(f"lesson field 'settings.{unknown[0]}' is not a RunConfig field; valid fields: "
                          f"{', '.join(_RUN_TYPES)}")
    for name, value in settings.items():
        _check_type(value, _RUN_TYPES[name], f"settings.{name}")
    for i, m in enumerate(settings.get("methods") or []):
        if not _METHOD.match(m):
            raise LessonError(f"lesson field 'settings.methods[{i}]' = {m!r} is not a method name "
                              "(lowercase letters, digits and '_')")
    try:  # RunConfig's own checks (positive ranks, steps >= 1, ...), on the defaults plus the lesson
        RunConfig.from_dict({**RunConfig().to_dict(), **settings})
    except (TypeError, ValueError) as err:
        raise LessonError(f"lesson field 'settings' is invalid: {err}") from None


def validate_lesson(data: Any) -> dict[str, Any]:
    """Check a parsed lesson and return a normalised copy (``schema_version`` and ``observed`` filled in).

    Raises:
        LessonError: the first problem found, naming the field (``settings.steps``, ``view``...).
    """
    if not isinstance(data, dict):
        raise LessonError(f"a lesson must be a JSON object, got {_kind(data)}")
    unknown = sorted(set(data) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise LessonError(f"unknown lesson field '{unknown[0]}'; valid fields: {', '.join(REQUIRED + OPTIONAL)}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise LessonError(f"lesson field '{missing[0]}' is missing")
    for key in ("id", "title", "summary", "predict", "look_for", "view") + (("observed",) if "observed" in data else ()):
        _check_type(data[key], "str", key)
    if not _ID.match(data["id"]):
        raise LessonError(f"lesson field 'id' = {data['id']!r} must be 1-64 lowercase letters, digits, '-' or '_'")
    if not data["title"].strip():
        raise LessonError("lesson field 'title' is empty")
    if data["view"] not in VIEWS:
        raise LessonError(f"lesson field 'view' = {data['view']!r} is not one of: {', '.join(VIEWS)}")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise LessonError(f"lesson field 'schema_version' must be {SCHEMA_VERSION}, got {version!r}")
    _check_settings(data["settings"])
    translations = _check_translations(data.get("translations", {}))
    return {**{k: data[k] for k in REQUIRED}, "observed": data.get("observed", ""), "schema_version": SCHEMA_VERSION,
            **({"translations": translations} if translations else {})}


def _check_translations(value: Any) -> dict[str, dict[str, str]]:
    """``{"zh-CN": {"title": ..., "summary": ...}, ...}``: known locales, text fields, strings."""
    if not isinstance(value, dict):
        raise LessonError(f"lesson field 'translations' must be an object of locales, got {_kind(value)}")
    for locale, texts in value.items():
        if locale not in LOCALES:
            raise LessonError(f"lesson field 'translations.{locale}': locale must be one of {', '.join(LOCALES)}")
        if not isinstance(texts, dict):
            raise LessonError(f"lesson field 'translations.{locale}' must be an object, got {_kind(texts)}")
        for key, text in texts.items():
            if key not in TEXT_FIELDS:
                raise LessonError(f"lesson field 'translations.{locale}.{key}' is not one of {', '.join(TEXT_FIELDS)}")
            _check_type(text, "str", f"translations.{locale}.{key}")
    return value


def localized(lesson: dict[str, Any], locale: str | None) -> dict[str, Any]:
    """``lesson`` with its texts in ``locale`` where it has them (English otherwise)."""
    texts = (lesson.get("translations") or {}).get(locale or "") or {}
    return {**lesson, **{k: v for k, v in texts.items() if v}}


def locale_of(accept_language: str | None, lang: str | None = None) -> str | None:
    """The lesson locale for a browser: ``?lang=`` if given, else its first Chinese language
    (Hong Kong, Macao, Taiwan and Hant: Traditional; other Chinese: Simplified), else None (English)."""
    for tag in ([lang] if lang else []) + [t.split(";")[0].strip() for t in (accept_language or "").split(",")]:
        low = (tag or "").lower()
        if low.startswith("en"):
            return None
        if low.startswith("zh"):
            return "zh-TW" if any(x in low for x in ("tw", "hk", "mo", "hant")) else "zh-CN"
    return None


def _reject_constant(name: str):
    raise LessonError(f"a lesson may not contain {name} (not valid JSON)")


def parse_lesson(text: str | bytes) -> dict[str, Any]:
    """Parse and validate lesson JSON text. Raises :class:`LessonError` with a clear message."""
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise LessonError(f"a lesson file must be under {MAX_BYTES // 1024} KB, got {len(text) // 1024} KB")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise LessonError("a lesson file must be UTF-8 text") from None
    if len(text.encode("utf-8")) > MAX_BYTES:
        raise LessonError(f"a lesson file must be under {MAX_BYTES // 1024} KB")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise LessonError(f"the lesson is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    return validate_lesson(data)


def load_lesson(path_or_str: str | Path | dict) -> dict[str, Any]:
    """A validated lesson from a file path, JSON text, or an already-parsed dict.

    Raises:
        LessonError: unreadable file, bad JSON or a field that fails the schema.
    """
    if isinstance(path_or_str, dict):
        return validate_lesson(path_or_str)
    if isinstance(path_or_str, str) and path_or_str.lstrip().startswith(("{", "[")):
        return parse_lesson(path_or_str)
    path = Path(path_or_str)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise LessonError(f"{path.name}: a lesson file must be under {MAX_BYTES // 1024} KB")
        raw = path.read_bytes()
    except OSError as err:
        raise LessonError(f"cannot read lesson file {path.name}: {err.strerror or err}") from None
    try:
        return parse_lesson(raw)
    except LessonError as err:
        raise LessonError(f"{path.name}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Writing, built-in lessons, and using a lesson
# ---------------------------------------------------------------------------------------------
def slug(title: str) -> str:
    """``"LoRA: the memory bill!"`` -> ``"lora-the-memory-bill"`` (a valid lesson id)."""
    s = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:64].strip("-")
    return s or "lesson"


def save_lesson(settings: RunConfig | dict[str, Any], title: str, summary: str = "", predict: str = "",
                look_for: str = "", view: str = "table", lesson_id: str | None = None,
                observed: str = "") -> str:
    """The JSON text of a lesson with these settings and texts (validated before it is returned).

    Args:
        settings: a ``RunConfig`` (every field is kept) or a dict of some of its fields.
        title, summary, predict, look_for, observed: the lesson's texts.
        view: where to look after the run (a key of :data:`VIEWS`).
        lesson_id: the id used in ``?lesson=...``; default derived from the title.

    Raises:
        LessonError: settings or texts that do not pass the schema.
    """
    values = settings.to_dict() if isinstance(settings, RunConfig) else dict(settings)
    lesson = {"schema_version": SCHEMA_VERSION, "id": lesson_id or slug(title), "title": title,
              "summary": summary, "predict": predict, "look_for": look_for, "view": view,
              "settings": values, "observed": observed}
    validate_lesson(lesson)
    return json.dumps(lesson, indent=2, ensure_ascii=False) + "\n"


def builtin_lessons() -> list[dict[str, Any]]:
    """The lessons shipped in ``bora_lab/teach/lessons/*.json``, in file-name order."""
    return [load_lesson(p) for p in sorted(LESSON_DIR.glob("*.json"))]


def get_lesson(lesson_id: str) -> dict[str, Any] | None:
    """The built-in lesson with this id, or None."""
    return next((les for les in builtin_lessons() if les["id"] == lesson_id), None)


def missing_methods(lesson: dict[str, Any]) -> list[str]:
    """Methods the lesson names that this installation has not registered."""
    from bora_lab.methods import registry

    return [m for m in lesson["settings"].get("methods", []) if m not in registry.METHODS]


def lesson_config(lesson: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """The ``RunConfig`` a lesson describes: ``base`` (default ``RunConfig()``) updated with its settings.

    Unavailable methods are left out (see :func:`missing_methods`).

    Raises:
        LessonError: none of the lesson's methods is available.
    """
    settings = dict(lesson["settings"])
    if "methods" in settings:
        missing = set(missing_methods(lesson))
        settings["methods"] = [m for m in settings["methods"] if m not in missing]
        if not settings["methods"]:
            raise LessonError(f"none of this lesson's methods is available here: {', '.join(sorted(missing))}")
        if settings.get("method_options"):
            settings["method_options"] = {k: v for k, v in settings["method_options"].items() if k not in missing}
    return RunConfig.from_dict({**(base or RunConfig()).to_dict(), **lr_choice(settings)})
