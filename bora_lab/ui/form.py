"""The Compare form: widgets <-> ``RunConfig`` and method options, task suggestions.

Every widget of the Compare tab is keyed by a ``RunConfig`` field name (``"steps"``, ``"ranks"``),
or by ``"<method>.<option>"`` for an option of a method's config dataclass (``"dora.detach_norm"``).
Types come from the dataclasses themselves, so a new ``RunConfig`` field or a new method option needs
no parsing code here. Nothing here imports torch itself (the method registry does, to register the
methods) and the engine is reached only through ``bora_lab.ui.tab_compare``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from bora_lab.config import RunConfig, SettingError
from bora_lab.methods import registry

OPTION_SEP = "."
SHARED_OPTIONS = ("rank", "alpha")  # every method has them; the UI has its own widgets for both
RUN_FIELDS: list[str] = [f.name for f in dataclasses.fields(RunConfig) if f.name not in ("method_options", "method_ranks")]
_FIELD_TYPES: dict[str, str] = {f.name: str(f.type) for f in dataclasses.fields(RunConfig)}
LIST_WIDGETS = ("methods", "ranks")  # multi-select widgets; other list fields are comma-separated text
_NAMES = {"lr": "learning rate", "alpha": "alpha (LoRA scaling)", "num_layers": "layers kept"}


# ---------------------------------------------------------------------------------------------
# The registry, as the widgets show it
# ---------------------------------------------------------------------------------------------
_AXIS_TAGS = {"none": "", "row (per output feature)": "row", "column (per input feature)": "col",
              "row + column": "row+col"}


def axis_tag(name: str) -> str:
    """Short tag of the axis a method's magnitude lives on: ``"row"``, ``"col"``, ``"row+col"`` or ``""``."""
    axis = registry.info(name)["magnitude_axis"]
    return _AXIS_TAGS.get(axis, axis)


def method_label(name: str) -> str:
    """Checkbox label: the name, and the axis of its magnitude in brackets (``"dora (row)"``)."""
    tag = axis_tag(name)
    return f"{name} ({tag})" if tag else name


def method_choices() -> list[tuple[str, str]]:
    """``(label, name)`` pairs for every registered method, in registration order."""
    return [(method_label(m), m) for m in registry.available()]


def method_line(name: str) -> str:
    """One Markdown line: name, one-line description and the axis its magnitude lives on."""
    info = registry.info(name)
    axis = "no magnitude vector" if info["magnitude_axis"] == "none" else f"magnitude {info['magnitude_axis']}"
    return f"**{name}**: {info['description']} · *{axis}*"


def method_notes(selected: list[str] | None) -> str:
    """What the selected methods do (shown under the checkboxes)."""
    known = [m for m in (selected or []) if m in registry.METHODS]
    if not known:
        return "*Select at least one method.*"
    return "\n".join(f"- {method_line(m)}" for m in known)


def option_specs() -> list[dict[str, Any]]:
    """One dict per method-specific option (rank and alpha excluded), drawn from the registry.

    Each dict holds ``key`` (``"dora.detach_norm"``), ``method``, ``name``, ``type`` (``"bool"``,
    ``"int"``, ``"float"``, ``"str"`` or another type string), ``default`` and the field metadata
    (``help``, ``min``, ``max``, ``choices``).
    """
    specs = []
    for method in registry.available():
        for f in registry.config_fields(method):
            if f["name"] in SHARED_OPTIONS:
                continue
            specs.append({**f, "key": f"{method}{OPTION_SEP}{f['name']}", "method": method})
    return specs


def option_methods() -> list[str]:
    """Methods that have options of their own, in registration order (one widget group each)."""
    return list(dict.fromkeys(s["method"] for s in option_specs()))


def methods_changed(selected: list[str] | None) -> tuple:
    """The methods checkbox changed: new notes, and show the option groups of the selected methods."""
    import gradio as gr

    chosen = set(selected or [])
    return (method_notes(selected), *(gr.update(visible=m in chosen) for m in option_methods()))


def input_keys() -> list[str]:
    """The order in which the layout passes widget values to ``config_from_ui``."""
    return RUN_FIELDS + [s["key"] for s in option_specs()]


# ---------------------------------------------------------------------------------------------
# RunConfig -> widget values -> RunConfig
# ---------------------------------------------------------------------------------------------
def _to_widget(value: Any, name: str) -> Any:
    type_str = _FIELD_TYPES[name]
    if value is None:
        return 0 if type_str == "int | None" else ""
    if name in LIST_WIDGETS:
        return [str(v) for v in value]  # dropdown/checkbox choices are strings
    if type_str.startswith("list["):
        return ", ".join(str(v) for v in value)
    return value


def ui_values(cfg: RunConfig | None = None) -> dict[str, Any]:
    """Widget values that show ``cfg`` (default ``RunConfig()``), keyed as ``input_keys()``."""
    cfg = cfg or RunConfig()
    values = {name: _to_widget(getattr(cfg, name), name) for name in RUN_FIELDS}
    for spec in option_specs():
        chosen = cfg.method_options.get(spec["method"], {})
        values[spec["key"]] = chosen.get(spec["name"], spec["default"])
    return values


def _pretty(name: str) -> str:
    return _NAMES.get(name, name).replace(OPTION_SEP, " option ").replace("_", " ")


def _number(value: Any, name: str, integer: bool) -> int | float:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{_pretty(name).capitalize()} is empty; enter a number.")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{_pretty(name).capitalize()} must be a number, got {value!r}.") from None
    if not math.isfinite(x):
        raise ValueError(f"{_pretty(name).capitalize()} must be a finite number, got {value!r}.")
    if integer:
        if x != int(x):
            raise ValueError(f"{_pretty(name).capitalize()} must be a whole number, got {value!r}.")
        return int(x)
    return x


def _bounded_int(digits: str, name: str, item: str) -> int:
    """``int(digits)``, refused above the field's ``max`` (``RunConfig`` metadata; 10,000 otherwise)."""
    field = RunConfig.__dataclass_fields__.get(name)
    hi = (field.metadata.get("max") if field is not None else None) or 10_000
    if len(digits) > len(str(hi)) or int(digits) > hi:
        raise ValueError(f"{_pretty(name).capitalize()}: {item!r} goes past {hi:,}, the largest allowed.")
    return int(digits)


def _int_list(value: Any, name: str) -> list[int]:
    """``["4", "8"]``, ``"4, 8"``, ``"0-3"`` or ``[4, 8]`` -> unique ints in the order given."""
    items = value if isinstance(value, (list, tuple)) else re.split(r"[,\s]+", str(value or "").strip())
    out: list[int] = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        span = re.fullmatch(r"(\d+)\s*-\s*(\d+)", item)
        if span:
            lo, hi = sorted((_bounded_int(span.group(1), name, item), _bounded_int(span.group(2), name, item)))
            if hi - lo >= 4096:
                raise ValueError(f"{_pretty(name).capitalize()}: {item!r} spans {hi - lo + 1:,} values; at most 4,096.")
            # bounded before expanding: "0-999999999" must not build a list
            out.extend(range(lo, hi + 1))
        elif re.fullmatch(r"\d+", item):
            out.append(_bounded_int(item, name, item))
        else:
            raise ValueError(f"{_pretty(name).capitalize()}: {item!r} is not a whole number.")
    return list(dict.fromkeys(out))


def _names(value: Any) -> list[str]:
    items = value if isinstance(value, (list, tuple)) else re.split(r"[,\s]+", str(value or ""))
    return [str(i).strip() for i in items if str(i).strip()]


def _coerce(value: Any, type_str: str, name: str) -> Any:
    """Parse one widget value into the field's declared type (types come as strings)."""
    optional = type_str.endswith("| None")
    base = type_str.removesuffix("| None").strip()
    if base == "bool":
        return bool(value)
    if base in ("int", "float"):
        if optional and (value is None or value == "" or (base == "int" and value == 0)):
            return None  # 0 / empty = "not set" (e.g. num_layers 0 keeps every layer)
        return _number(value, name, integer=base == "int")
    if base == "list[int]":
        ints = _int_list(value, name)
        return None if optional and not ints else ints
    if base == "list[float]":
        nums = [_number(v, name, integer=False) for v in _names(value)]
        return None if optional and not nums else nums
    if base.startswith("list["):
        names = _names(value)
        return None if optional and not names else names
    text = "" if value is None else str(value).strip()
    return None if optional and not text else text


def _method_options(methods: list[str], values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Options of the selected methods that differ from their defaults, checked against min/max."""
    out: dict[str, dict[str, Any]] = {}
    for spec in option_specs():
        if spec["method"] not in methods or spec["key"] not in values:
            continue
        value = _coerce(values[spec["key"]], spec["type"], spec["key"])
        if spec.get("choices") and value not in spec["choices"]:
            raise ValueError(f"{spec['key']} must be one of {', '.join(map(str, spec['choices']))}.")
        if "min" in spec and value is not None and value < spec["min"]:
            raise ValueError(f"{spec['key']} must be >= {spec['min']}, got {value}.")
        if "max" in spec and value is not None and value > spec["max"]:
            raise ValueError(f"{spec['key']} must be <= {spec['max']}, got {value}.")
        if value != spec["default"]:
            out.setdefault(spec["method"], {})[spec["name"]] = value
    return out


def _refuse_server_path(name: str, value: str) -> None:
    """The app takes ids, not the server's files: a path (or a name that exists on disk) is refused,
    without saying whether it exists, unless the operator allows it (``BORA_LAB_ALLOW_LOCAL_PATHS=1``)."""
    import os
    from pathlib import Path

    from bora_lab.limits import allow_local_paths

    if allow_local_paths():
        return
    text = str(value)
    looks_like_path = text.startswith(("/", "~", ".", "\\")) or ".." in text or "\\" in text or ":" in text
    try:
        exists = not looks_like_path and os.sep in text and Path(text).exists()
    except OSError:
        exists = True
    if looks_like_path or exists:
        raise ValueError(f"{_pretty(name).capitalize()}: enter a built-in name or a Hugging Face id (org/name); "
                         "paths on the server are not accepted here.")


def config_from_ui(**values: Any) -> RunConfig:
    """Build the ``RunConfig`` the widgets describe; missing keys keep ``RunConfig``'s defaults.

    Args:
        **values: widget values keyed as ``input_keys()``.

    Returns:
        The checked ``RunConfig``.

    Raises:
        ValueError: one specific sentence for people (no method selected, a rank that is not a
            whole number, an empty model...).
    """
    kwargs: dict[str, Any] = {}
    for name in RUN_FIELDS:
        if name in values:
            kwargs[name] = _coerce(values[name], _FIELD_TYPES[name], name)
    methods = kwargs.get("methods", RunConfig().methods)
    if not methods:
        raise ValueError("Select at least one method to compare.")
    unknown = [m for m in methods if m not in registry.METHODS]
    if unknown:
        raise ValueError(f"Unknown method {unknown[0]!r}; choose from: {', '.join(registry.available())}.")
    if "ranks" in kwargs and not kwargs["ranks"]:
        raise ValueError("Enter at least one rank (a whole number such as 8).")
    if 0 in kwargs.get("ranks", []):
        raise ValueError("Ranks must be at least 1.")
    if "model" in kwargs and not kwargs["model"]:
        raise ValueError("Enter a model: 'minilm' works offline, or a Hugging Face id when online.")
    if "task" in kwargs and not kwargs["task"]:
        raise ValueError("Choose a task: 'fine_foods' works offline.")
    for name in ("model", "task"):
        if name in kwargs:
            _refuse_server_path(name, kwargs[name])
    if kwargs.get("text_column") or kwargs.get("label_column"):
        from bora_lab.engine.tasks import TASKS

        if kwargs.get("task") in TASKS:
            raise ValueError(f"Text and label columns apply to a datasets id only; {kwargs['task']!r} is built in: "
                             "clear them.")
    kwargs["method_options"] = _method_options(methods, values)
    try:
        return RunConfig(**kwargs)
    except ValueError as err:
        msg = err.for_people() if isinstance(err, SettingError) else str(err)
        raise ValueError(msg[:1].upper() + msg[1:] + ("" if msg.endswith(".") else ".")) from None


def field_type(name: str) -> str:
    """The declared type of a ``RunConfig`` field, as a string (``"int | None"``)."""
    return _FIELD_TYPES[name]


# ---------------------------------------------------------------------------------------------
# Tasks suggest settings (the synthetic tasks use a toy model and a larger learning rate)
# ---------------------------------------------------------------------------------------------
def task_choices() -> list[tuple[str, str]]:
    """``(label, name)`` for every registered task, offline ones first."""
    from bora_lab.engine.tasks import TASKS

    specs = sorted(TASKS.values(), key=lambda s: s.online)
    return [(f"{s.name}: {s.description}", s.name) for s in specs]


def task_default_keys() -> list[str]:
    """Every ``RunConfig`` field that some task suggests a value for (the task dropdown's outputs)."""
    from bora_lab.engine.tasks import TASKS

    keys = {k for spec in TASKS.values() for k in spec.defaults}
    return [k for k in RUN_FIELDS if k in keys]


def task_changed(task: str, base: RunConfig | None = None) -> tuple:
    """The task dropdown changed: values for :func:`task_default_keys`, in that order."""
    return tuple(task_values(task, base).values())


def task_values(task: str, base: RunConfig | None = None) -> dict[str, Any]:
    """Widget values for :func:`task_default_keys` when ``task`` is picked: the task's suggestions,
    and ``base``'s values (default ``RunConfig()``) for what it does not suggest."""
    from bora_lab.engine.tasks import task_defaults

    cfg = base or RunConfig()
    suggested = task_defaults(task) if task else {}
    return {k: _to_widget(suggested.get(k, getattr(cfg, k)), k) for k in task_default_keys()}
