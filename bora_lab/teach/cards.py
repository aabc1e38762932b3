"""Method cards: everything a student needs to know about one registered method, from the registry.

A card is built only from what the method declares (class metadata, config dataclass, the tensors
its constructor creates, its ``num_params`` and its forward's source), so a new method gets a card
without any table here::

    card = method_card("bora", d_in=384, d_out=384, rank=8, model="minilm")
    card["tensors"]      # [{"name": "lora_A", "shape": [8, 384], "trainable": True, ...}, ...]
    card["trainable"], card["percent_of_model"]   # 521858, 2.30 (adapters + task head, as PEFT)
    print(card_markdown(card))
"""
from __future__ import annotations

import ast
import inspect
import re
import textwrap
from pathlib import Path
from typing import Any

SHARED_OPTIONS = ("rank", "alpha")
MAX_SOURCE_LINES = 30
_INDEX = re.compile(r"\.\d+\.")


def _tensor_rows(module, skip_prefix: str = "") -> list[dict[str, Any]]:
    """One row per parameter and (non-empty) buffer of ``module``: name, shape, numel, trainable, role."""
    rows = []
    for name, p in module.named_parameters():
        role = "frozen base" if name.startswith("base.") else ("trainable" if p.requires_grad else "frozen")
        rows.append({"name": name, "shape": list(p.shape), "numel": p.numel(), "trainable": p.requires_grad,
                     "role": role, "dtype": str(p.dtype).replace("torch.", "")})
    for name, b in module.named_buffers():
        if b is None or name.endswith("_w0_backup"):
            continue
        rows.append({"name": name, "shape": list(b.shape), "numel": b.numel(), "trainable": False,
                     "role": "buffer (frozen storage)" if name.startswith("base.") else "buffer (fixed)",
                     "dtype": str(b.dtype).replace("torch.", "")})
    return rows


def layer_tensors(name: str, d_in: int, d_out: int, rank: int = 8, alpha: float = 16.0,
                  **options: Any) -> list[dict[str, Any]]:
    """The tensors a layer-level method creates around one ``nn.Linear(d_in, d_out)``.

    Built around a ``meta``-device layer when the method allows it (no memory, no compute); methods
    that need real weights at init (QLoRA quantises them) get a real random layer, with the global
    RNG left untouched. No ``torch.device`` context is used: it would leak meta tensors into caches.
    """
    import torch
    from torch import nn

    from bora_lab.methods import wrap

    try:
        layer = wrap(nn.Linear(d_in, d_out, device="meta"), name, rank=rank, alpha=alpha, **options)
    except (NotImplementedError, RuntimeError):
        with torch.random.fork_rng(devices=[]):
            layer = wrap(nn.Linear(d_in, d_out), name, rank=rank, alpha=alpha, **options)
    return _tensor_rows(layer)


def model_tensors(model, name: str, rank: int = 8, alpha: float = 16.0, **options: Any) -> list[dict[str, Any]]:
    """What a model-level method adds or unfreezes, with layer indices folded (``layer.*.adapter``).

    ``model`` is a skeleton (:func:`bora_lab.teach.skeleton.skeleton`); it is copied, not changed.
    Task-head parameters (trained with every method) come last, with role ``"task head"``.
    """
    import copy

    from bora_lab.methods import apply
    from bora_lab.methods.whole_model import head_module_names

    work = copy.deepcopy(model)
    apply(work, name, rank=rank, alpha=alpha, **options)
    heads = tuple(h + "." for h in head_module_names(work))
    rows: dict[str, dict[str, Any]] = {}
    for pname, p in work.named_parameters():
        if not p.requires_grad:
            continue
        key = _INDEX.sub(".*.", pname)
        role = "task head" if pname.startswith(heads) else "trainable"
        row = rows.setdefault(key, {"name": key, "shape": list(p.shape), "numel": p.numel(), "trainable": True,
                                    "role": role, "dtype": str(p.dtype).replace("torch.", ""), "count": 0})
        row["count"] += 1
    return sorted(rows.values(), key=lambda r: r["role"] == "task head")


def forward_source(name: str) -> dict[str, str]:
    """The core of a method's forward: ``adapter_forward`` (layer) or ``apply_to_model`` (model).

    Returns ``{"qualname", "file", "code"}``; the docstring is removed and long bodies are cut
    at :data:`MAX_SOURCE_LINES` lines.
    """
    from bora_lab.methods import registry

    cls = registry.get(name)
    attr = "adapter_forward" if cls.kind == "layer" else "apply_to_model"
    fn = inspect.unwrap(getattr(cls, attr))
    fn = getattr(fn, "__func__", fn)
    code = textwrap.dedent(inspect.getsource(fn))
    lines = code.splitlines()
    try:
        node = ast.parse(code).body[0]
        first = node.body[0] if node.body else None
        if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
                and isinstance(first.value.value, str):
            del lines[first.lineno - 1:first.end_lineno]
    except SyntaxError:  # decorated oddities: show the source as it is
        pass
    if len(lines) > MAX_SOURCE_LINES:
        lines = lines[:MAX_SOURCE_LINES] + [f"    ...  # {len(lines) - MAX_SOURCE_LINES} more lines"]
    path = Path(inspect.getsourcefile(fn) or "")
    parts = path.parts
    rel = "/".join(parts[parts.index("bora_lab"):]) if "bora_lab" in parts else path.name
    return {"qualname": fn.__qualname__, "file": rel, "code": "\n".join(lines)}


def method_card(name: str, d_in: int = 384, d_out: int = 384, rank: int = 8,
                model_total_params: int | None = None, n_layers_wrapped: int | None = None, *,
                alpha: float = 16.0, model: Any = None, target_modules: list[str] | None = None,
                num_layers: int | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the card of ``name`` shows, as plain data.

    Args:
        name: a registered method (``bora_lab.methods.available()``).
        d_in, d_out: the chosen layer's shape (``W0: [d_out, d_in]``); used by layer-level methods.
        rank, alpha: the update's rank and scaling numerator.
        model_total_params, n_layers_wrapped: a quick count without a model: trainable =
            per-layer count x ``n_layers_wrapped``, percent of ``model_total_params``.
        model: a model id (``"minilm"``), a ``transformers`` config or a skeleton module: exact
            counts over its real target layers, plus its task head (takes precedence).
        target_modules, num_layers: as in ``RunConfig`` (used with ``model``).
        options: method-specific options (see ``registry.config_fields``).

    Returns:
        dict with the registry metadata (``formula``, ``paper``, ``source``, ``magnitude_axis``,
        ``mergeable``...), ``options`` (the method's own knobs), ``tensors`` (name, shape, numel,
        trainable, role), ``params_per_layer``, ``trainable``, ``percent_of_model``,
        ``n_layers_wrapped``, ``forward`` (source of the core) and ``notes``.

    Raises:
        ValueError: unknown method or option, or a rank outside ``[1, min(d_in, d_out)]``.
    """
    from bora_lab.methods import registry

    from .skeleton import count_params, skeleton

    info = registry.info(name)
    options = dict(options or {})
    cls = registry.get(name)
    card: dict[str, Any] = {**info, "rank": rank if cls.uses_rank else None, "alpha": alpha,
                            "options": [f for f in registry.config_fields(name) if f["name"] not in SHARED_OPTIONS],
                            "notes": [], "trainable": None, "percent_of_model": None,
                            "model_total_params": model_total_params, "n_layers_wrapped": n_layers_wrapped,
                            "model": model if isinstance(model, str) else None}
    net = None
    if model is not None:
        net = model if hasattr(model, "named_parameters") else skeleton(model, num_layers=num_layers)
    if cls.kind == "layer":
        card["layer"] = {"d_in": d_in, "d_out": d_out}
        card["tensors"] = layer_tensors(name, d_in, d_out, rank, alpha, **options)
        cfg = registry.make_config(name, rank=rank, alpha=alpha, **options)
        card["params_per_layer"] = int(cls.num_params(d_in, d_out, cfg, True))
    else:
        card["layer"] = None
        shown_on = net if net is not None else skeleton("minilm", num_layers=1)
        card["tensors"] = model_tensors(shown_on, name, rank, alpha, **options)
        card["params_per_layer"] = None
        if net is None:
            card["notes"].append("shapes shown on a one-layer MiniLM (no model chosen)")
    if net is not None:
        count = count_params(net, name, rank=rank, alpha=alpha, target_modules=target_modules, **options)
        card.update(trainable=count.trainable, percent_of_model=count.percent_of_base,
                    model_total_params=count.base_total, n_layers_wrapped=len(count.layers) or None,
                    adapter_params=count.adapter_params, head_params=count.head_params)
        if count.head_params:
            card["notes"].append(f"includes the task head ({count.head_params:,} parameters), trained with every method as the \"Trained head\" setting says: classifier+pooler by default; the adapter alone is {count.trainable - count.head_params:,}")
    elif card["params_per_layer"] is not None and n_layers_wrapped:
        card["trainable"] = card["params_per_layer"] * n_layers_wrapped
        if model_total_params:
            card["percent_of_model"] = 100.0 * card["trainable"] / model_total_params
    card["forward"] = forward_source(name)
    return card


def layer_choices(model: Any = "minilm", target_modules: list[str] | None = None) -> list[dict[str, Any]]:
    """The distinct target layers of ``model`` (indices folded): ``{"name", "d_in", "d_out", "count"}``."""
    from .skeleton import skeleton, target_layers

    net = model if hasattr(model, "named_parameters") else skeleton(model)
    out: dict[tuple[str, int, int], dict[str, Any]] = {}
    for name, d_in, d_out, _ in target_layers(net, target_modules):
        key = (_INDEX.sub(".*.", name), d_in, d_out)
        out.setdefault(key, {"name": key[0], "d_in": d_in, "d_out": d_out, "count": 0})["count"] += 1
    return list(out.values())


def cards_table(model: Any = "minilm", rank: int = 8, alpha: float = 16.0, num_layers: int | None = None,
                target_modules: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per registered method: trainable parameters and % of the model (BoRA table 1 style).

    A method that cannot be counted (e.g. rank too large for a layer) gets its reason in ``note``.
    """
    from bora_lab.methods import registry

    from .skeleton import count_params, skeleton

    net = model if hasattr(model, "named_parameters") else skeleton(model, num_layers=num_layers)
    rows = []
    for name in registry.available():
        info = registry.info(name)
        row = {"method": name, "kind": info["kind"], "trainable": None, "% of model": None,
               "magnitude axis": info["magnitude_axis"], "mergeable": info["mergeable"], "note": ""}
        try:
            c = count_params(net, name, rank=rank, alpha=alpha, target_modules=target_modules)
            row.update({"trainable": c.trainable, "% of model": round(c.percent_of_base, 4)})
        except Exception as err:  # noqa: BLE001  one method's failure must not hide the others' rows
            row["note"] = str(err).splitlines()[0] if str(err) else type(err).__name__
        rows.append(row)
    return rows


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]" if shape else "scalar"


def shapes_text(card: dict[str, Any]) -> str:
    """A plain-text shapes diagram: one line per tensor, trainable ones marked."""
    lines = []
    if card.get("layer"):
        lay = card["layer"]
        lines.append(f"x: [batch, tokens, in={lay['d_in']}]  ->  y: [batch, tokens, out={lay['d_out']}]")
    width = max((len(t["name"]) for t in card["tensors"]), default=4)
    for t in card["tensors"]:
        mark = "*" if t["trainable"] else " "
        times = f"  x{t['count']}" if t.get("count", 1) > 1 else ""
        lines.append(f"{mark} {t['name']:<{width}}  {_shape(t['shape']):<14} {t['numel']:>12,}  {t['role']}{times}")
    lines.append("(* = trainable)")
    return "\n".join(lines)


def card_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown, with the formula in ``$$...$$`` for KaTeX (Gradio's Markdown renders it)."""
    md = [f"### {card['name']}  ·  `{card['class']}`", card.get("description") or ""]
    if card.get("formula"):
        md.append(f"$$\n{card['formula']}\n$$")
    facts = [
        ("Kind", "wraps each target nn.Linear" if card["kind"] == "layer" else "changes the model around its layers"),
        ("Magnitude axis", card["magnitude_axis"]),
        ("Mergeable", "yes: the update folds into W after training" if card["mergeable"] else "no"),
        ("Rank", card["rank"] if card.get("rank") is not None else "not used"),
        ("Paper", card.get("paper") or "-"),
        ("From the sources", card.get("source") or "-"),
        ("Suggested learning rate", f"{card['suggested_lr']:g} on the default task ({card['suggested_lr_source']})"
         if card.get("suggested_lr") else "-"),
    ]
    if card.get("params_per_layer") is not None:
        lay = card["layer"]
        facts.append(("Trainable per layer", f"{card['params_per_layer']:,} for W0: [{lay['d_out']}, {lay['d_in']}]"))
    if card.get("trainable") is not None:
        pct = f" ({card['percent_of_model']:.4f}% of {card['model_total_params']:,})" \
            if card.get("percent_of_model") is not None else ""
        where = f" on {card['model']}" if card.get("model") else ""
        facts.append((f"Trainable{where}", f"{card['trainable']:,}{pct}"))
    md.append("\n".join(f"- **{k}:** {v}" for k, v in facts))
    md.append("**Shapes**\n```text\n" + shapes_text(card) + "\n```")
    if card["options"]:
        md.append("**Options**\n" + "\n".join(
            f"- `{o['name']}` = `{o['default']!r}`: {o.get('help', '')}" for o in card["options"]))
    fwd = card["forward"]
    md.append(f"**Core of the forward** (`{fwd['qualname']}`, {fwd['file']})\n```python\n{fwd['code']}\n```")
    if card["notes"]:
        md.append("*" + "; ".join(card["notes"]) + ".*")
    return "\n\n".join(s for s in md if s)
