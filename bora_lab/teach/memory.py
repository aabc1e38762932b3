"""Memory calculator: what fine-tuning a model with a method costs, component by component.

Five components, in bytes (1 GB = 10^9 bytes, as in the lecture notes 'Parameter-Efficient
Fine-Tuning' (EE4016) that the worked examples below come from):

* **weights**: frozen base parameters at the storage precision (fp32 4 B, bf16 2 B, int8 1 B,
  NF4 0.5 B plus its quantisation constants: 32/64 bits per weight, or 8/64 + 32/(64·256) =
  0.127 bits with double quantisation, lecture notes, QLoRA section, "Double Quantization").
  With int8/NF4 only the weights of the Linear layers inside the transformer blocks are quantised,
  as bitsandbytes does; embeddings, norms, biases and the output layer stay at the compute
  precision, unless ``quantize_all`` (the lecture's simplification: 8 B parameters x 0.5 B = 4 GB).
  Base parameters the method trains (BitFit's biases, the task head, all of them for
  ``full_model``) at the training precision (bf16, or fp32 for an fp32 model);
* **adapter**: the tensors the method adds, at ``adapter_precision``;
* **gradients**: one per trainable parameter, at ``grad_precision``;
* **optimizer states**: AdamW keeps two moments (fp32: 8 B; 8-bit: 2 B) and, when the trainable
  parameters are 16-bit and the optimizer 32-bit, an fp32 master copy (4 B), so mixed-precision
  full fine-tuning costs 2 + 2 + 12 = 16 B per parameter (the lecture's "128 GB" for Llama-3-8B).
  Paged optimizers hold the same bytes but may be evicted to CPU RAM under GPU pressure.
* **activations**: per transformer layer ``s·b·h·(34 + 5·a·s/h)`` bytes for 16-bit activations
  (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  arXiv:2205.05198, sec. 4.1, no parallelism; s = sequence length, b = batch, h = hidden size,
  a = attention heads). Simplifications: ×2 for fp32 compute; the ``5·a·s/h`` attention-score term
  is dropped with ``flash_attention``; gradient checkpointing keeps each layer's input (``2·s·b·h``)
  plus one layer's full activations during recomputation; a causal LM adds its fp32 logits
  (``4·b·s·V``). Frozen layers store slightly less than the formula (no weight gradients need
  their inputs), so this is an upper bound for PEFT.

The lecture's QLoRA arithmetic (QLoRA section, "How does QLoRA reduce memory to 14GB?") counts, per
trainable parameter, 0.5 B weight + 2 B LoRA (bf16) + 2 B AdamW states (8-bit) + 4 B gradients
(fp32) = 8.5 B, and for full fine-tuning 2 B weight + 2 B gradient + 12 B Adam = 16 B;
:func:`estimate_memory` reports the same split in ``per_trainable_bytes`` (its "base weight" entry
is the base storage byte the lecture adds for adapter methods; the totals count base weights once,
over all base parameters).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GB = 1e9
PRECISION_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "nf4": 0.5}
TRAIN_PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": {"bytes": 8.0, "bits32": True, "paged": False, "label": "AdamW, two fp32 moments"},
    "adamw_8bit": {"bytes": 2.0, "bits32": False, "paged": False, "label": "AdamW 8-bit (bitsandbytes), two 1-byte moments"},
    "paged_adamw": {"bytes": 8.0, "bits32": True, "paged": True, "label": "paged AdamW 32-bit (QLoRA)"},
    "paged_adamw_8bit": {"bytes": 2.0, "bits32": False, "paged": True, "label": "paged AdamW 8-bit"},
    "sgd": {"bytes": 0.0, "bits32": True, "paged": False, "label": "SGD without momentum (no state)"},
}
COMPONENTS = ("weights", "adapter", "gradients", "optimizer", "activations")
KORTHIKANTI = "Korthikanti et al. 2022 (arXiv:2205.05198): s·b·h·(34 + 5·a·s/h) bytes per layer, 16-bit"


@dataclass
class ModelSpec:
    """The sizes the calculator needs, and the config that gives exact adapter counts."""

    name: str
    n_params: int  # parameters of the base model (task head included)
    n_layers: int
    hidden: int
    n_heads: int
    vocab: int
    kind: str  # "classification" | "causal_lm"
    config: Any = None  # transformers config (for the skeleton); None = no exact counts

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("config")
        return d


def spec_from_model(model_id: str = "minilm", num_layers: int | None = None, task_kind: str | None = None) -> ModelSpec:
    """The spec of an offline model (``minilm``, ``smollm2``), a local folder or any Hugging Face id.

    Hub ids need the network (only the config is fetched). Raises ``SkeletonError`` (a ValueError).
    """
    from .skeleton import resolve_config, skeleton

    config = resolve_config(model_id)
    net = skeleton(config, task_kind=task_kind, num_layers=num_layers)
    return _spec(model_id, net)


SIZE_LIMITS = {"parameters": 10**13, "layers": 1_000, "hidden size": 65_536, "vocabulary": 2_000_000,
               "attention heads": 1_024, "key/value heads": 1_024}
RUN_LIMITS = {"rank": 65_536, "batch size": 65_536, "sequence length": 1_048_576}


def spec_from_sizes(n_params: float, n_layers: int, hidden: int, vocab: int = 32000, n_heads: int | None = None,
                    intermediate: int | None = None, n_kv_heads: int | None = None, name: str = "custom",
                    tie_embeddings: bool = False) -> ModelSpec:
    """A Llama-style decoder of the given sizes (for models with no config at hand).

    The MLP width is solved from ``n_params`` when not given:
    ``n_params ≈ V·h·(1 or 2) + L·(2h² + 2h·kv + 3h·i)``. Weights are counted from ``n_params``
    exactly; adapter counts come from the Llama layers (q, k, v, o by default).

    Raises:
        ValueError: sizes that cannot describe a model (e.g. embeddings larger than ``n_params``).
    """
    from transformers import LlamaConfig

    n_params, n_layers, hidden, vocab = int(n_params), int(n_layers), int(hidden), int(vocab)
    for what, value in (("parameters", n_params), ("layers", n_layers), ("hidden size", hidden), ("vocabulary", vocab)):
        if value < 1:
            raise ValueError(f"{what} must be at least 1, got {value:,}")
    for what, value in (("parameters", n_params), ("layers", n_layers), ("hidden size", hidden),
                        ("vocabulary", vocab), ("attention heads", n_heads or 1), ("key/value heads", n_kv_heads or 1)):
        if value > SIZE_LIMITS[what]:  # the estimate builds the model's skeleton: keep it to real model sizes
            raise ValueError(f"{what} must be <= {SIZE_LIMITS[what]:,} (the largest real models), got {value:,}")
    n_heads = int(n_heads or max(1, hidden // 128))
    if hidden % n_heads:
        raise ValueError(f"hidden size {hidden} is not divisible by {n_heads} attention heads")
    n_kv = int(n_kv_heads or n_heads)
    kv = hidden // n_heads * n_kv
    if intermediate is None:
        rest = n_params - vocab * hidden * (1 if tie_embeddings else 2) - n_layers * (2 * hidden * hidden + 2 * hidden * kv)
        intermediate = rest // (3 * hidden * n_layers)
        if intermediate < 1:
            raise ValueError(f"{n_params:,} parameters are too few for {n_layers} layers of hidden size {hidden} "
                             f"and a {vocab:,}-token vocabulary; check the sizes")
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                         num_key_value_heads=n_kv, intermediate_size=int(intermediate), vocab_size=vocab,
                         tie_word_embeddings=tie_embeddings)
    config.architectures = ["LlamaForCausalLM"]
    return ModelSpec(name, n_params, n_layers, hidden, n_heads, vocab, "causal_lm", config)


def _spec(name: str, net) -> ModelSpec:
    c = net.config
    n = sum(p.numel() for p in {id(p): p for p in net.parameters()}.values())
    return ModelSpec(name, n, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.vocab_size,
                     getattr(net, "bora_lab_task_kind", "classification"), c)


def quant_constant_bits(precision: str, double_quant: bool = True, blocksize: int = 64) -> float:
    """Extra bits per weight for the absmax constants: NF4 ``32/b`` or ``8/b + 32/(b·256)`` with DQ."""
    if precision != "nf4":
        return 0.0
    return 8 / blocksize + 32 / (blocksize * 256) if double_quant else 32 / blocksize


def activation_bytes(spec: ModelSpec, batch_size: int, seq_len: int, compute: str = "bf16",
                     gradient_checkpointing: bool = False, flash_attention: bool = False) -> dict[str, float]:
    """Activation memory (see the module docstring): ``{"per_layer", "layers", "logits", "total"}``."""
    s, b, h, a, L = seq_len, batch_size, spec.hidden, spec.n_heads, spec.n_layers
    scale = 2.0 if compute == "fp32" else 1.0
    per_layer = s * b * h * (34 + (0 if flash_attention else 5 * a * s / h)) * scale
    layers = L * 2 * s * b * h * scale + per_layer if gradient_checkpointing else L * per_layer
    logits = 4.0 * b * s * spec.vocab if spec.kind == "causal_lm" else 0.0
    return {"per_layer": per_layer, "layers": layers, "logits": logits, "total": layers + logits}


def _check(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def estimate_memory(model: ModelSpec | str = "minilm", method: str = "lora", rank: int = 8,
                    precision: str = "fp32", batch_size: int = 16, seq_len: int = 128, optimizer: str = "adamw",
                    gradient_checkpointing: bool = False, *, alpha: float = 16.0, adapter_precision: str | None = None,
                    grad_precision: str | None = None, trainable_params: int | None = None,
                    target_modules: list[str] | None = None, double_quant: bool = True, blocksize: int = 64,
                    flash_attention: bool = False, compute_precision: str | None = None,
                    quantize_all: bool = False, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Estimate the training memory of ``method`` on ``model``.

    Args:
        model: a :class:`ModelSpec` or a model id for :func:`spec_from_model`.
        method, rank, alpha, target_modules, options: as in ``bora_lab.methods.apply``.
        precision: storage of the frozen base: ``fp32``, ``bf16``, ``int8`` or ``nf4``.
        batch_size, seq_len: tokens per step.
        optimizer: a key of :data:`OPTIMIZERS`.
        gradient_checkpointing: recompute activations in backward (see :func:`activation_bytes`).
        adapter_precision: precision of the added tensors; default fp32 for an fp32 model, else bf16.
        grad_precision: precision of the gradients; default ``adapter_precision``.
        trainable_params: override the counted trainable parameters (treated as adapter tensors),
            e.g. the lecture's "0.6% of 8B".
        double_quant, blocksize: NF4 constants (QLoRA: on, 64).
        flash_attention: no stored attention scores.
        compute_precision: precision of the activations; default fp32 for an fp32 model, else bf16
            (BoRA Lab's trainer: fp32 on CPU, bf16 autocast on CUDA); also the precision of the frozen
            parameters an int8/NF4 model leaves unquantised.
        quantize_all: with int8/NF4, count every frozen parameter as quantised (the lecture's arithmetic).

    Returns:
        ``{"components": {name: bytes}, "total", "params", "per_trainable_bytes", "per_trainable_total",
        "details", "notes", "inputs", "model"}``.
    """
    for what, value in (("rank", rank), ("batch size", batch_size), ("sequence length", seq_len)):
        if not 0 <= int(value) <= RUN_LIMITS[what]:
            raise ValueError(f"{what} must be between 0 and {RUN_LIMITS[what]:,}, got {value:,}")
    from .skeleton import count_params, skeleton

    _check("precision", precision, PRECISION_BYTES)
    _check("optimizer", optimizer, OPTIMIZERS)
    train_prec = "fp32" if precision == "fp32" else "bf16"
    adapter_precision = adapter_precision or train_prec
    grad_precision = grad_precision or adapter_precision
    compute_precision = compute_precision or train_prec
    _check("adapter precision", adapter_precision, TRAIN_PRECISIONS)
    _check("compute precision", compute_precision, TRAIN_PRECISIONS)
    _check("gradient precision", grad_precision, TRAIN_PRECISIONS)
    if min(batch_size, seq_len, rank) < 1:
        raise ValueError("batch size, sequence length and rank must be at least 1")
    spec = model if isinstance(model, ModelSpec) else spec_from_model(model)
    notes: list[str] = []
    if trainable_params is not None:
        trainable, added = int(trainable_params), int(trainable_params)
        notes.append(f"trainable parameters given: {trainable:,} ({100 * trainable / spec.n_params:.3f}% of the model)")
    net = skeleton(spec.config, task_kind=spec.kind) if spec.config is not None else None
    if trainable_params is None and net is None:
        raise ValueError("this model spec has no config: give trainable_params")
    if trainable_params is None:
        count = count_params(net, method, rank=rank, alpha=alpha, target_modules=target_modules, **(options or {}))
        trainable, added = count.trainable, count.adapter_params
    trained_base = min(max(trainable - added, 0), spec.n_params)  # existing parameters made trainable
    frozen = spec.n_params - trained_base
    quantized = frozen  # fp32/bf16: "quantised" simply means stored at ``precision``
    if precision in ("int8", "nf4") and not quantize_all and net is not None:
        quantized = min(block_linear_params(net), frozen)

    base_b = PRECISION_BYTES[precision]
    const_bits = quant_constant_bits(precision, double_quant, blocksize)
    opt = OPTIMIZERS[optimizer]
    master = 4.0 if opt["bits32"] and (PRECISION_BYTES[adapter_precision] < 4) else 0.0
    opt_b = opt["bytes"] + master
    weights_raw = quantized * base_b
    constants = quantized * const_bits / 8
    unquantized = (frozen - quantized) * PRECISION_BYTES[compute_precision]
    comp = {
        "weights": weights_raw + constants + unquantized + trained_base * PRECISION_BYTES[train_prec],
        "adapter": added * PRECISION_BYTES[adapter_precision],
        "gradients": trainable * PRECISION_BYTES[grad_precision],
        "optimizer": trainable * opt_b,
    }
    act = activation_bytes(spec, batch_size, seq_len, compute_precision, gradient_checkpointing, flash_attention)
    comp["activations"] = act["total"]
    # The lecture's per-trainable-parameter bill: the frozen weight the adapter sits on (only when
    # the method adds tensors), the trainable weight itself, its gradient and its optimizer states.
    per = {"base weight": base_b if added else 0.0,
           "trainable weight": PRECISION_BYTES[adapter_precision if added else train_prec],
           "gradient": PRECISION_BYTES[grad_precision], "optimizer": opt_b}
    if master:
        notes.append("optimizer includes a 4-byte fp32 master copy of each 16-bit trainable parameter")
    if opt["paged"]:
        notes.append("paged optimizer: its states may be evicted to CPU RAM, so the GPU peak can be lower")
    if precision in ("int8", "nf4") and quantized == frozen:
        notes.append(f"every frozen parameter counted at {precision} (the lecture's simplification; real loaders "
                     "keep embeddings, norms and the output layer in 16-bit)")
    elif precision in ("int8", "nf4"):
        notes.append(f"{quantized:,} Linear-layer weights at {precision}; the other {frozen - quantized:,} frozen "
                     f"parameters (embeddings, norms, biases, output layer) at {compute_precision}")
    return {
        "components": comp, "total": sum(comp.values()),
        "params": {"base": spec.n_params, "trainable": trainable, "added": added, "trained_base": trained_base},
        "per_trainable_bytes": per, "per_trainable_total": sum(per.values()),
        "details": {"weights_raw": weights_raw, "quant_constants": constants, "quant_constant_bits": const_bits,
                    "quantized_params": quantized, "unquantized_weights": unquantized,
                    "activations_per_layer": act["per_layer"], "activations_layers": act["layers"],
                    "logits": act["logits"], "optimizer_paged": opt["paged"], "optimizer_label": opt["label"],
                    "activation_formula": KORTHIKANTI},
        "notes": notes,
        "inputs": {"method": method, "rank": rank, "precision": precision, "batch_size": batch_size,
                   "seq_len": seq_len, "optimizer": optimizer, "gradient_checkpointing": gradient_checkpointing,
                   "adapter_precision": adapter_precision, "grad_precision": grad_precision,
                   "compute_precision": compute_precision,
                   "flash_attention": flash_attention, "double_quant": double_quant, "quantize_all": quantize_all},
        "model": spec.to_dict(),
    }


def block_linear_params(model) -> int:
    """Weights of the Linear (and GPT-2 Conv1D) layers a 4/8-bit loader quantises: every one except
    the task head and the output embedding (bitsandbytes skips ``lm_head``)."""
    from bora_lab.methods.whole_model import is_linear, head_module_names

    heads = tuple(h + "." for h in head_module_names(model)) + tuple(head_module_names(model))
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    seen: set[int] = set()
    total = 0
    for name, m in model.named_modules():
        if not is_linear(m) or m is out or name.startswith(heads) or id(m.weight) in seen:
            continue
        seen.add(id(m.weight))
        total += m.weight.numel()
    return total


def method_defaults(method: str) -> dict[str, str]:
    """The precision and optimizer a method implies (QLoRA family: NF4 base, paged AdamW), from its class.

    A method declares them with class attributes ``base_precision`` / ``optimizer``; a config with an
    NF4 ``double_quant`` option also implies ``nf4``. Methods that declare nothing get ``{}``.
    """
    from bora_lab.methods import registry

    cls = registry.get(method)
    out = {}
    prec = getattr(cls, "base_precision", None)
    if prec is None and any(f["name"] == "double_quant" for f in registry.config_fields(method)):
        prec = "nf4"
    if prec in PRECISION_BYTES:
        out["precision"] = prec
    if getattr(cls, "optimizer", None) in OPTIMIZERS:
        out["optimizer"] = cls.optimizer
    return out


def summary_rows(breakdown: dict[str, Any]) -> list[list[Any]]:
    """``[component, GB, share %]`` rows plus the total, for a table."""
    total = breakdown["total"] or 1.0
    rows = [[k, round(v / GB, 4), round(100 * v / total, 1)] for k, v in breakdown["components"].items()]
    return rows + [["total", round(breakdown["total"] / GB, 4), 100.0]]
