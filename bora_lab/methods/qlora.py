"""QLoRA (Dettmers et al., arXiv:2305.14314) and its DoRA/BoRA variants over an NF4 base.

The frozen ``W0`` is stored as 4-bit NormalFloat with double-quantised absmax constants
(:mod:`bora_lab.methods.nf4`, about 4.127 bits per weight) and dequantised on the fly in every
forward; the adapter (LoRA, DoRA or BoRA) stays in the layer's dtype on top of it. At init the
layer computes the *dequantised* base, not the original one: ``reference_weight()`` returns it,
and the quantisation error is what :func:`nf4.error_stats` reports.

The adapter math is reused unchanged: :class:`NF4Linear` stands in for the frozen ``nn.Linear``
(its ``weight`` is the dequantised ``W0``), and :class:`_NF4Base` only swaps the base, so
``qdora``/``qbora`` are DoRA/BoRA read over a quantised weight.

Paged optimizer: the classes set ``optimizer = "paged_adamw"``; :func:`paged_adamw` returns
bitsandbytes' paged AdamW on CUDA and plain ``torch.optim.AdamW`` elsewhere (paging moves
optimizer state between GPU and CPU memory, so on the CPU it does not apply).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import nf4
from .base import AdapterConfig, NormConfig, lora_delta
from .bora import BoRALinear
from .dora import DoRALinear
from .lora import LoRALinear
from .registry import register

BACKENDS = ("auto", "torch", "bitsandbytes")


@dataclass
class QuantOptions:
    """NF4 storage options shared by ``qlora``, ``qdora`` and ``qbora`` (QLoRA defaults)."""

    blocksize: int = field(default=nf4.BLOCKSIZE, metadata={
        "help": "weights per absmax constant (QLoRA: 64)", "choices": [32, 64, 128, 256]})
    double_quant: bool = field(default=True, metadata={
        "help": "quantise the absmax constants to 8 bits, block 256 (QLoRA: on; ~4.127 vs 4.5 bits/weight)"})
    backend: str = field(default="auto", metadata={
        "help": "auto: bitsandbytes kernels on CUDA when installed, else torch; torch: always the "
                "pure-torch NF4 (CPU ok); bitsandbytes: always bitsandbytes", "choices": list(BACKENDS)})

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.blocksize not in (32, 64, 128, 256):
            raise ValueError(f"blocksize must be 32, 64, 128 or 256, got {self.blocksize}")
        if self.backend == "bitsandbytes" and not nf4.bnb_available():
            raise ValueError("backend='bitsandbytes' needs the bitsandbytes package; use 'auto' or 'torch'")


@dataclass
class QLoRAConfig(QuantOptions, AdapterConfig):
    """QLoRA: LoRA options plus the NF4 storage options."""


@dataclass
class QNormConfig(QuantOptions, NormConfig):
    """QDoRA/QBoRA: DoRA/BoRA options plus the NF4 storage options."""


class NF4Linear(nn.Module):
    """A frozen Linear whose weight is kept in NF4 and dequantised on the fly.

    ``weight`` is a read-only property: the dequantised ``W0`` (in the layer's dtype), or the dense
    merged weight while an adapter is merged into it. ``bias`` is the original (frozen) bias.
    """

    def __init__(self, linear: nn.Linear, blocksize: int = nf4.BLOCKSIZE, double_quant: bool = True,
                 backend: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.backend = backend
        w = linear.weight.detach()
        use_bnb = backend == "bitsandbytes" or (backend == "auto" and w.is_cuda and nf4.bnb_available())
        q = nf4.quantize_bnb(w, blocksize, double_quant) if use_bnb else nf4.quantize(w, blocksize, double_quant)
        self.blocksize, self.dq_blocksize, self.compute_dtype = q.blocksize, q.dq_blocksize, w.dtype
        self.register_buffer("packed", q.packed)  # uint8 [ceil(out·in/2)]
        self.register_buffer("absmax", q.absmax)  # uint8 (double quant) or fp32 [n_blocks]
        self.register_buffer("absmax2", q.absmax2)  # fp32 [ceil(n_blocks/256)] or None
        self.register_buffer("offset", q.offset)  # fp32 [] or None
        self.register_buffer("merged_weight", None, persistent=False)  # dense W while merged
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def nf4(self) -> nf4.NF4Tensor:
        """The stored weight as an :class:`nf4.NF4Tensor` (views of the buffers, no copy)."""
        return nf4.NF4Tensor(self.packed, self.absmax, self.absmax2, self.offset,
                             (self.out_features, self.in_features), self.compute_dtype,
                             self.blocksize, self.dq_blocksize)

    def _use_bnb(self, t: Tensor) -> bool:
        return self.backend == "bitsandbytes" or (self.backend == "auto" and t.is_cuda and nf4.bnb_available())

    def dequantized(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dequantised ``W0`` (``[out, in]``), a fresh tensor on every call (nothing cached)."""
        q = self.nf4()
        w = nf4.dequantize_bnb(q, dtype) if self._use_bnb(self.packed) else nf4.dequantize(q, dtype)
        return w.to(dtype or self.compute_dtype)

    @property
    def weight(self) -> Tensor:
        return self.merged_weight if self.merged_weight is not None else self.dequantized()

    def forward(self, x: Tensor) -> Tensor:
        if self.merged_weight is not None:
            return F.linear(x, self.merged_weight, self.bias)
        if self._use_bnb(x):
            return nf4.matmul_bnb(x, self.nf4(), self.bias)
        return F.linear(x, self.dequantized(x.dtype), self.bias)

    def nbytes(self) -> int:
        """Bytes of the NF4 storage (codes, absmax constants, double-quantisation constants)."""
        return self.nf4().nbytes()

    def _apply(self, fn, recurse=True):
        # .to(dtype)/.half() must not touch the fp32 quantisation constants; only the compute dtype changes.
        keep = {k: self._buffers[k] for k in ("absmax", "absmax2", "offset")
                if self._buffers[k] is not None and self._buffers[k].is_floating_point()}
        super()._apply(fn, recurse)
        for k, v in keep.items():
            self._buffers[k] = v.to(self.packed.device)
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return self

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, nf4 blocksize={self.blocksize}, "
                f"double_quant={self.absmax2 is not None}, backend={self.backend}")


class _NF4Base:
    """Mixin that stores a method's frozen base in NF4; the adapter math is the parent's, unchanged.

    Merge writes ``W = effective_weight()`` as a dense weight (QLoRA checkpoints are merged into
    a 16-bit copy of the base); unmerge drops it and the 4-bit storage serves again.
    """

    # At init the layer equals the *dequantised* base (reference_weight()), not the fp32 one, so
    # the registry-wide identity test against the original Linear does not apply; see
    # tests/test_methods_quant.py for the identity against the dequantised base.
    identity_at_init = False
    optimizer = "paged_adamw"  # read by the trainer; see paged_adamw()

    def __init__(self, base: nn.Linear, cfg):
        stored = NF4Linear(base, cfg.blocksize, cfg.double_quant, cfg.backend)
        # The parent initialises its tensors (DoRA/BoRA magnitudes) from the dequantised W0, so the
        # layer starts exactly at the function of the quantised model.
        view = nn.Linear(base.in_features, base.out_features, bias=False, device=base.weight.device,
                         dtype=base.weight.dtype)
        with torch.no_grad():
            view.weight.copy_(stored.dequantized())
        super().__init__(view, cfg)
        self.base = stored
        # What inspect() shows: the pretrained weight against the 16 code values, and the error of
        # storing it in NF4 (measured now: the original weight is not kept).
        self._nf4_report = {"histogram": nf4.histogram(base.weight, blocksize=cfg.blocksize),
                            "error": nf4.error_stats(base.weight, stored.nf4())}

    @property
    def weight0(self) -> Tensor:
        """The dequantised ``W0`` (also while merged)."""
        return self.base.dequantized()

    def inspect(self) -> dict:
        """Adds ``nf4``: ``histogram`` (:func:`nf4.histogram` of the pretrained weight), ``error``
        (:func:`nf4.error_stats`: rmse, relative error, SQNR, bits per weight...) and ``blocksize``."""
        return {**super().inspect(), "nf4": {**self._nf4_report, "blocksize": self.base.blocksize}}

    def reference_weight(self) -> Tensor:
        """The function the layer computes at init: the dequantised base weight."""
        return self.base.dequantized()

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self.base.merged_weight = self.effective_weight().detach().to(self.base.compute_dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.merged_weight = None
        self.merged = False

    def memory_bytes(self) -> dict[str, float]:
        """Frozen-base storage vs. dense copies, and the adapter's size (bytes)."""
        n = self.in_features * self.out_features
        adapter = sum(p.numel() * p.element_size() for p in self.parameters() if p.requires_grad)
        return {"base_nf4": self.base.nbytes(), "base_fp32": 4 * n, "base_bf16": 2 * n, "adapter": adapter,
                "bits_per_weight": 8.0 * self.base.nbytes() / n}

    @staticmethod
    def optimizer_hint(device: torch.device | str | None = None) -> str:
        """What :func:`paged_adamw` does on ``device``."""
        return _optimizer_note(torch.device(device) if device is not None else None)


@register("qlora", QLoRAConfig)
class QLoRALinear(_NF4Base, LoRALinear):
    """QLoRA: ``y = x · dequant(W0_NF4)ᵀ + s · (x Aᵀ) Bᵀ + b``; only A and B train."""

    description = "LoRA over a frozen 4-bit NF4 base (double-quantised), dequantised on the fly"
    formula = (r"W = \operatorname{dequant}(c_2^{\text{FP32}}, c_1^{\text{8bit}}, W_0^{\text{NF4}})"
               r" + \frac{\alpha}{r} B A")
    paper = "Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs (arXiv:2305.14314)"
    source = ("lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), QLoRA section: "
              "NF4, double quantization, paged optimizers")

    def adapter_forward(self, x: Tensor) -> Tensor:
        return self.base(x) + lora_delta(x, self.lora_A, self.lora_B, self.scale)


@register("qdora", QNormConfig)
class QDoRALinear(_NF4Base, DoRALinear):
    """QDoRA: DoRA (magnitude per output feature) with ``V = dequant(W0_NF4) + s·B@A``."""

    description = "DoRA (magnitude per output feature) over a frozen 4-bit NF4 base"
    formula = (r"W = \operatorname{diag}\!\left(\frac{m}{\lVert \hat W_0 + sBA \rVert_{\text{row}}}\right)"
               r"(\hat W_0 + sBA),\ \hat W_0 = \operatorname{dequant}(W_0^{\text{NF4}})")
    paper = "Liu et al. 2024 (DoRA, arXiv:2402.09353) over QLoRA's NF4 base (Dettmers et al. 2023)"
    source = ("lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), QLoRA section and "
              "the QDoRA rows of the SBoRA MMLU table; "
              "Liu et al., 2024, DoRA, arXiv:2402.09353")


@register("qbora", QNormConfig)
class QBoRALinear(_NF4Base, BoRALinear):
    """QBoRA: BoRA (row then column magnitudes) with ``V = dequant(W0_NF4) + s·B@A``."""

    description = "BoRA (magnitudes on rows and columns) over a frozen 4-bit NF4 base"
    formula = (r"V = \hat W_0 + sBA,\ W = \operatorname{diag}\!\left(\tfrac{m_r}{\lVert V\rVert_{\text{row}}}\right)"
               r"V\operatorname{diag}\!\left(\tfrac{m_c}{c}\right),\ \hat W_0 = \operatorname{dequant}(W_0^{\text{NF4}})")
    paper = ("BoRA (Wang et al. 2024, arXiv:2412.06441) over QLoRA's NF4 base "
             "(Dettmers et al. 2023, arXiv:2305.14314); a BoRA Lab composition")
    source = ("Wang et al., 2024, BoRA, arXiv:2412.06441, §3.2, eq. 3; "
              "lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), QLoRA section")


def storage_report(model: nn.Module) -> dict[str, float]:
    """Bytes the model's weights take with NF4 bases, against the same bases stored dense.

    Returns ``nf4_layers``, ``quantized_weights`` (count), ``nf4_bytes``, ``as_fp32_bytes``,
    ``as_bf16_bytes``, ``bits_per_weight``, ``model_bytes`` (all parameters and buffers as stored)
    and ``model_bytes_dense_fp32`` (the same model with fp32 bases): the saving QLoRA makes.
    """
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    n = sum(m.in_features * m.out_features for m in layers)
    nf4_bytes = sum(m.nbytes() for m in layers)
    stored = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    quant = {id(t) for m in layers for t in (m.packed, m.absmax, m.absmax2, m.offset) if t is not None}
    other = sum(t.numel() * t.element_size() for k, t in stored.items() if k not in quant)
    return {"nf4_layers": len(layers), "quantized_weights": n, "nf4_bytes": nf4_bytes, "as_fp32_bytes": 4 * n,
            "as_bf16_bytes": 2 * n, "bits_per_weight": 8.0 * nf4_bytes / n if n else 0.0,
            "model_bytes": other + nf4_bytes, "model_bytes_dense_fp32": other + 4 * n}


def _optimizer_note(device: torch.device | None) -> str:
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if cuda and nf4.bnb_available():
        return "paged AdamW (bitsandbytes.optim.PagedAdamW): optimizer state pages to CPU memory under GPU pressure"
    if cuda:
        return "paged AdamW needs bitsandbytes, which is not installed: plain torch AdamW"
    return "paged optimizers page GPU memory to the CPU, so they do not apply on the CPU: plain torch AdamW"


def paged_adamw(params: Iterable[Tensor], lr: float = 1e-3, **kwargs) -> tuple[torch.optim.Optimizer, str]:
    """QLoRA's optimizer where it applies: returns ``(optimizer, note)``.

    bitsandbytes' ``PagedAdamW`` when the parameters live on CUDA and bitsandbytes is installed;
    ``torch.optim.AdamW`` otherwise. ``note`` says which and why (for logs and the UI).
    """
    params = [p for p in params if p.requires_grad]
    device = params[0].device if params else None
    note = _optimizer_note(device)
    if note.startswith("paged AdamW (bitsandbytes"):
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW(params, lr=lr, **kwargs), note
    return torch.optim.AdamW(params, lr=lr, **kwargs), note
