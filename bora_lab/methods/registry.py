"""The method registry: one dict from a lowercase name to an adapter class and its config.

A method is declared by decorating its class with ``@register("name", ConfigClass)`` in its own
module and importing that module in ``bora_lab/methods/__init__.py``. Nothing else (trainer, UI,
CLI, tests) needs editing: they all iterate over :data:`METHODS`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

METHODS: dict[str, type] = {}

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register(name: str, config_cls: type):
    """Class decorator that adds a method to :data:`METHODS`.

    Args:
        name: lowercase registry key (``"dora"``).
        config_cls: dataclass holding the method's options (rank, alpha and its own knobs).
    """
    if not _NAME.match(name):
        raise ValueError(f"method name {name!r} must be lowercase letters, digits and '_'")
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config for {name!r} must be a dataclass, got {config_cls!r}")

    def deco(cls):
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered by {METHODS[name].__name__}")
        cls.name = name
        cls.config_cls = config_cls
        METHODS[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """Registered method names, in registration order."""
    return list(METHODS)


def get(name: str) -> type:
    """The class registered as ``name``; a ValueError lists the valid names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


def make_config(name: str, **options: Any):
    """Build the config dataclass of ``name`` from keyword options, rejecting unknown keys."""
    cls = get(name)
    valid = {f.name for f in dataclasses.fields(cls.config_cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(
            f"method {name!r} has no option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(valid))}"
        )
    return cls.config_cls(**options)


def config_fields(name: str) -> list[dict[str, Any]]:
    """Describe the options of ``name`` for UIs: one dict per dataclass field.

    Each dict has ``name``, ``type`` (a string), ``default`` and the field's ``metadata``
    (``help``, ``min``, ``max``, ``choices``...). Rank and alpha are included; UIs that have their
    own rank/alpha widgets skip them.
    """
    cls = get(name)
    out = []
    for f in dataclasses.fields(cls.config_cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append({"name": f.name, "type": type_name, "default": default, **dict(f.metadata)})
    return out


def info(name: str) -> dict[str, Any]:
    """Metadata a UI or a method card shows: description, axis, kind, mergeable, formula, paper."""
    cls = get(name)
    return {
        "name": name,
        "class": cls.__name__,
        "description": cls.description,
        "magnitude_axis": cls.magnitude_axis,
        "kind": cls.kind,
        "mergeable": cls.mergeable,
        "has_weight": cls.has_effective_weight,
        "uses_rank": cls.uses_rank,
        "formula": cls.formula,
        "paper": cls.paper,
        "source": cls.source,
        "identity_at_init": cls.identity_at_init,
        "suggested_lr": _rates().suggested_lr(name),
        "suggested_lr_source": _rates().source(name),
    }


def _rates():
    from . import rates

    return rates
