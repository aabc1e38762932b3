"""Per-run dropout streams inside one batched forward (the shared-base engine's randomness).

In the per-copy path every run draws its dropout masks from its own RNG stream, and all runs of a
comparison start that stream from the same seed, so at every step they see the same masks (a
paired design). The shared-base engine runs the k runs' batches as one ``[k·B, ...]`` forward;
a single dropout call over that batch would draw one mask from one stream. Here every random op of
the forward is applied chunk by chunk (chunk i = run i's ``B`` rows) with the global RNG set to run
i's stream, i.e. exactly the call, shapes and RNG consumption of the per-copy path:

* ``nn.Dropout`` modules are replaced by :class:`StreamDropout`;
* attention dropout (passed by transformers as ``dropout=p`` to the attention function) goes
  through an attention implementation registered here, which calls the model's own
  implementation chunk by chunk while training, and once on the whole batch when ``dropout == 0``
  (evaluation, or models without attention dropout, e.g. Llama).

Runs whose streams are equal (same seed, same consumption) share one stream: each of their chunks
starts from the same state, and the stream advances once.

A plan (:func:`planned`) says which stream each chunk uses; without one, the modules behave as
plain dropout.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor, nn

_PLAN = threading.local()
PREFIX = "bora_lab_streams:"


def get_rng(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The global RNG state: the CPU generator's and, on CUDA, the device generator's."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    """Restore a :func:`get_rng` state."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class StreamPlan:
    """Chunk i of every batched tensor uses stream ``chunk_stream[i]``; ``states`` hold the streams'
    RNG states (CPU state, CUDA state or None) and advance as random ops run."""

    def __init__(self, chunk_stream: list[int], states: list[tuple[Tensor, Tensor | None]], device: torch.device):
        self.chunk_stream, self.states, self.device = chunk_stream, states, device

    @property
    def chunks(self) -> int:
        return len(self.chunk_stream)

    def _get(self) -> tuple[Tensor, Tensor | None]:
        return get_rng(self.device)

    def _set(self, state: tuple[Tensor, Tensor | None]) -> None:
        set_rng(state, self.device)

    def per_chunk(self, fn, *tensors: Tensor) -> list:
        """``[fn(*(t_i for t in tensors)) for each chunk i]``, each call on its stream's RNG.

        Tensors whose first dimension is not ``chunks × B`` (e.g. a mask broadcast over the batch)
        are passed whole to every call.
        """
        total = tensors[0].shape[0]
        pieces = [t.chunk(self.chunks) if t is not None and t.dim() and t.shape[0] == total else None
                  for t in tensors]
        outer = self._get()
        ends: dict[int, tuple[Tensor, Tensor | None]] = {}
        out = []
        try:
            for i, s in enumerate(self.chunk_stream):
                self._set(self.states[s])
                args = [p[i] if p is not None else t for p, t in zip(pieces, tensors)]
                out.append(fn(*args))
                ends[s] = self._get()
        finally:
            self._set(outer)
        for s, state in ends.items():
            self.states[s] = state
        return out


def current() -> StreamPlan | None:
    return getattr(_PLAN, "plan", None)


@contextlib.contextmanager
def planned(plan: StreamPlan) -> Iterator[StreamPlan]:
    """Make ``plan`` the active plan of this thread for the duration of a forward."""
    previous = current()
    _PLAN.plan = plan
    try:
        yield plan
    finally:
        _PLAN.plan = previous


class StreamDropout(nn.Dropout):
    """``nn.Dropout`` that, under a plan and in training, drops each chunk with its run's stream."""

    def forward(self, x: Tensor) -> Tensor:
        plan = current()
        if plan is None or not self.training or self.p == 0 or x.shape[0] % plan.chunks:
            return super().forward(x)
        return torch.cat(plan.per_chunk(super().forward, x))


def replace_dropouts(model: nn.Module) -> int:
    """Swap every ``nn.Dropout`` of ``model`` for a :class:`StreamDropout` (same ``p``); returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Dropout:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, StreamDropout(module.p, module.inplace))
            count += 1
    return count


def use_stream_attention(model: nn.Module) -> str | None:
    """Route ``model``'s attention through the per-chunk wrapper of its current implementation.

    Returns None when done (or when the model has no attention implementation to route), else
    why not: the wrapper needs the implementation to be a registered function (``sdpa``, flash,
    flex...); the eager implementation is each model's own function, so per-run attention dropout
    cannot be kept and the caller falls back to the per-copy path.
    """
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if config is None or impl is None or impl.startswith(PREFIX):
        return None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl not in ALL_ATTENTION_FUNCTIONS:
        return f"attention implementation {impl!r} is the model's own function (sdpa is needed to share the base)"
    name = PREFIX + impl
    if name not in ALL_ATTENTION_FUNCTIONS:
        inner = ALL_ATTENTION_FUNCTIONS[impl]

        def attention(module, query, key, value, attention_mask, dropout: float = 0.0, **kwargs):
            plan = current()
            if plan is None or dropout == 0.0 or query.shape[0] % plan.chunks:
                return inner(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
            parts = plan.per_chunk(lambda q, k, v, m: inner(module, q, k, v, m, dropout=dropout, **kwargs),
                                   query, key, value, attention_mask)
            weights = [p[1] for p in parts]
            return torch.cat([p[0] for p in parts]), (None if weights[0] is None else torch.cat(weights))

        ALL_ATTENTION_FUNCTIONS.register(name, attention)
        if impl in ALL_MASK_ATTENTION_FUNCTIONS:
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    config._attn_implementation = name
    return None
