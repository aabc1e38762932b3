"""4-bit NormalFloat (NF4) with double quantisation, in plain torch (QLoRA, arXiv:2305.14314).

The storage layout is the one ``bitsandbytes`` uses, so both can read each other's tensors:

* the weight is flattened (row-major) and cut into blocks of 64; each block is divided by its
  absolute maximum ``absmax`` and every value is replaced by the index of the nearest of the
  16 NF4 code values (:func:`codebook`);
* two 4-bit indices are packed per ``uint8``, the first one in the high nibble;
* double quantisation: the ``absmax`` constants (one fp32 per block) minus their mean are
  quantised again with 8-bit blockwise quantisation (block size 256, bitsandbytes' dynamic
  8-bit map, :func:`dynamic_map`), keeping one fp32 scale per 256 blocks and the fp32 mean.

Memory per parameter: ``4 + 8/64 + 32/(64·256) ≈ 4.127`` bits (``4 + 32/64 = 4.5`` without
double quantisation). Where ``bitsandbytes`` is installed, :func:`quantize_bnb`,
:func:`dequantize_bnb` and :func:`matmul_bnb` run its kernels on the same storage.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

BLOCKSIZE = 64  # weights per absmax constant (QLoRA)
DQ_BLOCKSIZE = 256  # absmax constants per second-level fp32 scale (QLoRA double quantisation)
# Outermost quantile: the mean of 1 - 1/(2·15) and 1 - 1/(2·16) (QLoRA appendix; bitsandbytes'
# create_normal_map default), so the extreme code values land at ±1 after normalisation.
NF4_OFFSET = 0.9677083
# The 16 values published with QLoRA (bitsandbytes' NF4 table); :func:`codebook` recomputes them.
NF4_PAPER_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


@functools.cache
def _codebook_cpu(offset: float) -> Tensor:
    # Recipe of the lecture notes 'Parameter-Efficient Fine-Tuning' (EE4016), QLoRA section, "Steps for
    # generating the NF4 data type values": 8 quantiles for the positive half, 7 for the negative half,
    # and an exact 0.
    # explicit device="cpu": a caller's `with torch.device("meta")` must not poison this cache
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, device="cpu")[:-1].double())  # (8,)
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, device="cpu")[:-1].double())  # (7,)
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64, device="cpu"), neg]).float().sort().values
    return values / values.max()  # normalised in fp32, as bitsandbytes does


def codebook(device: torch.device | str | None = None, offset: float = NF4_OFFSET) -> Tensor:
    """The 16 NF4 code values, sorted, in ``[-1, 1]`` with an exact 0 (fp32, shape ``[16]``).

    Built from normal quantiles as in QLoRA: ``Φ⁻¹`` at 8 evenly spaced probabilities from
    ``offset`` to 0.5 (positive half) and at 7 (negative half), plus 0, divided by the maximum.
    """
    return _codebook_cpu(float(offset)).to(device or "cpu", copy=True)


@functools.cache
def _dynamic_map_cpu() -> Tensor:
    # bitsandbytes' signed dynamic tree map (create_dynamic_map(signed=True, max_exponent_bits=7)).
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32, device="cpu")
        means = ((bounds[:-1] + bounds[1:]) / 2.0) * (10 ** (-6 + i))
        data += means.tolist() + (-means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32, device="cpu")


def dynamic_map(device: torch.device | str | None = None) -> Tensor:
    """The 256-value signed dynamic 8-bit map bitsandbytes uses for double quantisation."""
    return _on_device("dynamic", str(torch.device(device or "cpu"))).clone()


@functools.cache
def _on_device(table: str, device: str) -> Tensor:
    """Constant tables, copied once per device for the hot paths (read-only: never modify them)."""
    if table == "dynamic":
        return _dynamic_map_cpu().to(device)
    code = _codebook_cpu(NF4_OFFSET)
    if table == "code":
        return code.to(device)
    # byte -> (value of the high nibble, value of the low nibble): one lookup dequantises two weights
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).to(device)  # (256, 2)


@dataclass
class NF4Tensor:
    """A weight in NF4 storage (see the module docstring for the layout).

    Attributes:
        packed: ``uint8 [ceil(n/2)]``, two 4-bit code indices per byte, first in the high nibble.
        absmax: ``uint8 [n_blocks]`` 8-bit codes when double-quantised, else ``float32 [n_blocks]``.
        absmax2: ``float32 [ceil(n_blocks/dq_blocksize)]`` second-level scales (double quant only).
        offset: ``float32 []`` mean subtracted from the absmax constants (double quant only).
        shape, dtype: the original weight's shape and dtype.
    """

    packed: Tensor
    absmax: Tensor
    absmax2: Tensor | None
    offset: Tensor | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int = BLOCKSIZE
    dq_blocksize: int = DQ_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self) -> int:
        """Bytes of storage, double-quantisation constants included (shared code tables excluded)."""
        tensors = [self.packed, self.absmax, self.absmax2, self.offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes() / max(self.numel, 1)


def _block_scale(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Divide ``flat`` (fp32 ``[n]``) by its blockwise absmax: returns (scaled ``[n]``, absmax ``[nb]``)."""
    n = flat.numel()
    nb = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)  # zeros keep absmax
    absmax = padded.abs().amax(dim=1)  # (nb,)
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1)
    return scaled.reshape(-1)[:n], absmax


def _nearest(scaled: Tensor, code: Tensor) -> Tensor:
    """Index of the nearest code value (ties go to the lower one, as bitsandbytes)."""
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)


def _pack(idx: Tensor) -> Tensor:
    idx = idx.to(torch.uint8)
    if idx.numel() % 2:  # an odd count gets one padding code: the index of 0.0, as bitsandbytes
        idx = torch.nn.functional.pad(idx, (0, 1), value=_ZERO_INDEX)
    return (idx[0::2] << 4) | idx[1::2]


_ZERO_INDEX = NF4_PAPER_VALUES.index(0.0)  # 7


def _unpack(packed: Tensor) -> Tensor:
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()  # (2·len,)


def quantize(w: Tensor, blocksize: int = BLOCKSIZE, double_quant: bool = True,
             dq_blocksize: int = DQ_BLOCKSIZE) -> NF4Tensor:
    """Quantise ``w`` (any shape, float) to NF4 in plain torch.

    Args:
        w: the weight; it is read in fp32 and not modified.
        blocksize: weights per absmax constant (QLoRA: 64).
        double_quant: quantise the absmax constants to 8 bits (QLoRA: True).
        dq_blocksize: absmax constants per fp32 scale in the second level (QLoRA: 256).
    """
    flat = w.detach().reshape(-1).float()
    scaled, absmax = _block_scale(flat, blocksize)
    packed = _pack(_nearest(scaled, _on_device("code", str(flat.device))))
    absmax2 = offset = None
    if double_quant:
        offset = absmax.mean()
        scaled2, absmax2 = _block_scale(absmax - offset, dq_blocksize)
        absmax = _nearest(scaled2, _on_device("dynamic", str(flat.device))).to(torch.uint8)
    return NF4Tensor(packed, absmax, absmax2, offset, tuple(w.shape), w.dtype, blocksize, dq_blocksize)


def dequantize_absmax(q: NF4Tensor) -> Tensor:
    """The (first-level) absmax constants as fp32 ``[n_blocks]``, undoing double quantisation."""
    if not q.double_quant:
        return q.absmax.float()
    nb = q.absmax.numel()
    vals = _on_device("dynamic", str(q.absmax.device))[q.absmax.long()]  # (nb,)
    scale = q.absmax2.repeat_interleave(q.dq_blocksize)[:nb]
    return vals * scale + q.offset


def dequantize(q: NF4Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Rebuild the dense weight (computed in fp32, returned in ``dtype`` or the original dtype)."""
    n, bs = q.numel, q.blocksize
    absmax = dequantize_absmax(q)  # (nb,)
    pairs = _on_device("pairs", str(q.packed.device))
    vals = pairs.index_select(0, q.packed.int()).view(-1)  # (2·ceil(n/2),)
    if vals.numel() != absmax.numel() * bs:  # a partial last block
        vals = torch.nn.functional.pad(vals[:n], (0, absmax.numel() * bs - n))
    return (vals.view(-1, bs) * absmax.unsqueeze(1)).view(-1)[:n].view(q.shape).to(dtype or q.dtype)


def code_indices(q: NF4Tensor) -> Tensor:
    """The 4-bit code index (0..15) of every weight, shape ``q.shape``."""
    return _unpack(q.packed)[: q.numel].view(q.shape)


def error_stats(w: Tensor, q: NF4Tensor | None = None, **quant_options) -> dict[str, float]:
    """Quantisation error and memory of ``w`` in NF4 (``q`` is computed if not given).

    Returns plain floats: ``mse``, ``rmse``, ``max_abs_error``, ``mean_abs_error``,
    ``relative_error`` (``||Ŵ−W||_F/||W||_F``), ``sqnr_db``, ``bits_per_param``, ``nf4_bytes``,
    ``fp32_bytes``, ``bf16_bytes`` and the compression ratios against fp32 and bf16.
    """
    q = q if q is not None else quantize(w, **quant_options)
    ref = w.detach().float()
    diff = dequantize(q, torch.float32) - ref
    err2, sig2 = diff.pow(2).sum().item(), ref.pow(2).sum().item()
    n, nbytes = ref.numel(), q.nbytes()
    return {
        "mse": err2 / max(n, 1),
        "rmse": math.sqrt(err2 / max(n, 1)),
        "max_abs_error": diff.abs().max().item() if n else 0.0,
        "mean_abs_error": diff.abs().mean().item() if n else 0.0,
        "relative_error": math.sqrt(err2 / sig2) if sig2 > 0 else 0.0,
        "sqnr_db": 10 * math.log10(sig2 / err2) if err2 > 0 and sig2 > 0 else math.inf,
        "bits_per_param": q.bits_per_param(),
        "nf4_bytes": nbytes,
        "fp32_bytes": 4 * n,
        "bf16_bytes": 2 * n,
        "compression_vs_fp32": 4 * n / nbytes,
        "compression_vs_bf16": 2 * n / nbytes,
    }


def histogram(w: Tensor, bins: int = 64, blocksize: int = BLOCKSIZE) -> dict[str, list]:
    """Histogram data of ``w`` against the NF4 code values, as plain lists for the UI.

    The weights are first divided by their block's absmax, as the quantiser sees them, so they
    lie in ``[-1, 1]`` like the code values.

    Returns:
        ``edges`` (``bins + 1``) and ``counts`` (``bins``) of the block-normalised weights,
        ``code_values`` (16) and ``code_counts`` (16: how many weights each code value receives).
    """
    scaled, _ = _block_scale(w.detach().reshape(-1).float(), blocksize)
    code = _on_device("code", str(scaled.device))
    counts = torch.histc(scaled, bins=bins, min=-1.0, max=1.0)
    code_counts = torch.bincount(_nearest(scaled, code), minlength=16)
    return {
        "edges": torch.linspace(-1.0, 1.0, bins + 1).tolist(),
        "counts": [int(c) for c in counts.tolist()],
        "code_values": code.tolist(),
        "code_counts": code_counts.tolist(),
    }


# -- bitsandbytes bridge (optional fast path) ----------------------------------------------------
@functools.cache
def _bnb_functional():
    try:
        import bitsandbytes.functional as bnb_f
    except Exception:  # noqa: BLE001  (ImportError, or RuntimeError from a broken native library)
        return None
    return bnb_f


def bnb_available() -> bool:
    """True when ``bitsandbytes`` imports (its kernels then serve as the fast path)."""
    return _bnb_functional() is not None


def to_bnb_state(q: NF4Tensor, dtype: torch.dtype | None = None):
    """A ``bitsandbytes.functional.QuantState`` that reads ``q``'s buffers (no copy)."""
    bnb_f = _bnb_functional()
    if bnb_f is None:
        raise ImportError("bitsandbytes is not installed; use the torch backend")
    dev = q.packed.device
    state2 = None
    if q.double_quant:
        state2 = bnb_f.QuantState(absmax=q.absmax2, code=_on_device("dynamic", str(dev)), blocksize=q.dq_blocksize,
                                  dtype=torch.float32)
    return bnb_f.QuantState(absmax=q.absmax, shape=torch.Size(q.shape), dtype=dtype or q.dtype,
                            blocksize=q.blocksize, code=_on_device("code", str(dev)), quant_type="nf4",
                            offset=q.offset, state2=state2)


def quantize_bnb(w: Tensor, blocksize: int = BLOCKSIZE, double_quant: bool = True) -> NF4Tensor:
    """Quantise with bitsandbytes' kernels (second-level block size fixed at 256 by bitsandbytes)."""
    bnb_f = _bnb_functional()
    if bnb_f is None:
        raise ImportError("bitsandbytes is not installed; use nf4.quantize")
    packed, st = bnb_f.quantize_4bit(w.detach(), blocksize=blocksize, compress_statistics=double_quant,
                                     quant_type="nf4")
    absmax2 = st.state2.absmax.float() if double_quant else None
    offset = st.offset.float().reshape(()) if double_quant else None
    return NF4Tensor(packed.reshape(-1).view(torch.uint8), st.absmax, absmax2, offset, tuple(w.shape),
                     w.dtype, blocksize, DQ_BLOCKSIZE)


def dequantize_bnb(q: NF4Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``dequantize`` with bitsandbytes' kernel."""
    bnb_f = _bnb_functional()
    return bnb_f.dequantize_4bit(q.packed.view(-1, 1), to_bnb_state(q, dtype or q.dtype))


def matmul_bnb(x: Tensor, q: NF4Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ W.T (+ bias)`` with bitsandbytes' 4-bit matmul (dequantises inside its kernel)."""
    import bitsandbytes as bnb

    return bnb.matmul_4bit(x, q.packed.view(-1, 1).t(), quant_state=to_bnb_state(q, x.dtype), bias=bias)
