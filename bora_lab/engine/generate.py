"""Stream continuations of a causal LM token by token, several models side by side.

    streams = {rid: stream_continuation(run.model, tok, "It is a truth", 40) for rid, run in runs.items()}
    for texts in side_by_side(streams):  # {"lora-r8": "universally", "dora-r8": "that"}, then longer...
        print(texts)

Each continuation comes from ``model.generate`` (the same call as ``reload.predict``, so methods that
hook the model's cache, such as prefix and prompt tuning, generate here exactly as there). ``generate``
runs in a helper thread and hands each new token to a *lockstep* streamer, which waits until the
reader asks for the next one: models stepped by :func:`side_by_side` take turns on the CPU, one token
each, instead of all of them competing for it, and all columns grow together.

Sampling draws from a ``torch.Generator`` of its own (a logits processor), never from torch's global
random state: a training running in another thread swaps that state around its steps, and the two
must not disturb each other. The same seed gives the same continuation.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

MAX_NEW_TOKENS = 200  # the most tokens one continuation may have (the app's slider stops here)
IDLE_S = 120.0  # a generation whose reader asked for nothing this long stops (an abandoned page)
_END = object()  # the streamer's last item: generation finished


class _Stopped(Exception):
    """Raised inside ``generate`` (from the streamer) when the reader went away."""


class _LockstepStreamer:
    """A ``transformers`` streamer (``put``/``end``) that gives one token per request of the reader."""

    def __init__(self) -> None:
        self.tokens: queue.Queue = queue.Queue()  # token ids, then an exception or _END
        self.go = threading.Semaphore(0)  # one release per token the reader asks for
        self.stopped = False
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt itself
            self._prompt_seen = True
            return
        if not self.go.acquire(timeout=IDLE_S) or self.stopped:  # wait until the reader asks for this token
            raise _Stopped
        self.tokens.put(int(value.reshape(-1)[0]))

    def end(self) -> None:
        self.tokens.put(_END)


class SampleWith:
    """Logits processor that samples the next token at ``temperature`` with its own generator and
    leaves only that token (every other score is ``-inf``): greedy decoding then picks it."""

    def __init__(self, temperature: float, seed: int = 0):
        self.temperature = float(temperature)
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1).cpu()  # (B, vocab)
        choice = torch.multinomial(probs, 1, generator=self.generator).to(scores.device)  # (B, 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, choice, 0.0)


def stream_continuation(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 50,
                        temperature: float = 0.0, seed: int = 0) -> Iterator[str]:
    """Yield the continuation of ``prompt`` so far, one new token at a time (decoded, special tokens
    dropped). Closing the generator stops the generation at its next token.

    Args:
        model: a causal LM (``generate``), in eval mode.
        tokenizer: its tokenizer.
        prompt: the text to continue (its last tokens are kept if it is longer than the model allows).
        max_new_tokens: 1 to :data:`MAX_NEW_TOKENS`.
        temperature: 0 for greedy decoding; above 0, sampling at that temperature (seeded by ``seed``).
        seed: the sampling seed.

    Raises:
        ValueError: ``max_new_tokens`` or ``temperature`` out of range; any error of ``generate``
            (raised here, in the reader's thread).
    """
    if not 1 <= int(max_new_tokens) <= MAX_NEW_TOKENS:
        raise ValueError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")
    room = getattr(model.config, "max_position_embeddings", None)
    if isinstance(room, int) and ids["input_ids"].shape[1] + max_new_tokens > room:  # keep the end of the prompt
        keep = max(1, room - int(max_new_tokens))
        ids = {k: v[:, -keep:] for k, v in ids.items()}
    ids = {k: v.to(device) for k, v in ids.items()}
    streamer = _LockstepStreamer()
    kwargs: dict[str, Any] = dict(max_new_tokens=int(max_new_tokens), do_sample=False, streamer=streamer,
                                  pad_token_id=tokenizer.pad_token_id)
    if temperature > 0:
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([SampleWith(temperature, seed)])

    def work() -> None:
        try:
            with torch.no_grad():
                model.generate(**ids, **kwargs)
        except _Stopped:
            pass
        except Exception as err:  # noqa: BLE001 - handed to the reader, who raises it
            streamer.tokens.put(err)
        finally:
            streamer.tokens.put(_END)

    thread = threading.Thread(target=work, name="bora-lab-generate", daemon=True)
    thread.start()
    new: list[int] = []
    try:
        while True:
            streamer.go.release()  # ask for the next token
            item = streamer.tokens.get()
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            new.append(item)
            yield tokenizer.decode(new, skip_special_tokens=True)
    finally:  # finished, failed, or the reader closed us: let the thread leave generate
        streamer.stopped = True
        streamer.go.release()


def side_by_side(streams: dict[str, Iterator[str]]) -> Iterator[dict[str, str]]:
    """Step every stream by one item in turn; yield ``{name: latest text}`` after each round, until all
    have ended. Closing this generator closes the streams still running.

    Args:
        streams: name -> an iterator of growing texts (e.g. :func:`stream_continuation`).
    """
    texts = {name: "" for name in streams}
    running = dict(streams)
    try:
        while running:
            moved = False
            for name, it in list(running.items()):
                try:
                    texts[name], moved = next(it), True
                except StopIteration:
                    del running[name]
            if moved:
                yield dict(texts)
    finally:
        for it in running.values():
            close = getattr(it, "close", None)
            if close is not None:
                close()
