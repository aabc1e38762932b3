"""The app's training queue: one comparison trains at a time, the others wait in arrival order.

Gradio's own queue cannot tell a waiting visitor where they stand among the events of one
``concurrency_id``, and it cannot let a second visitor watch a training that another visitor's event
holds. So the Run button's event is not limited by Gradio; each comparison (a ``visitor.Job``) joins
this FIFO instead and trains when it reaches the front. A waiting page shows its position and an
estimated start: the remaining time of the comparison training now (its live ETA, from measured
step times) plus the estimates of those ahead of it (``bora_lab.engine.estimate``, step times
measured on a 2-core CPU).

Anything with a ``remaining_s()`` method (seconds, or None when unknown) can queue: the Paper
claims tab's re-runs join through :func:`queued_event`.
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any


class TrainingQueue:
    """A FIFO of tickets for ``slots`` training slots, with positions and start estimates."""

    def __init__(self, slots: int = 1) -> None:
        self.slots = slots
        self._cond = threading.Condition()
        self._waiting: list[Any] = []  # tickets in arrival order
        self._running: list[Any] = []

    def join(self, ticket: Any) -> None:
        """Put ``ticket`` at the back of the queue (its position is known from now on)."""
        with self._cond:
            if ticket not in self._waiting and ticket not in self._running:
                self._waiting.append(ticket)
            self._cond.notify_all()

    def acquire(self, ticket: Any, cancelled: Callable[[], bool] = lambda: False, timeout: float | None = None,
                poll_s: float = 0.5) -> bool:
        """Wait until ``ticket`` is at the front and a slot is free, then hold the slot (True).

        Returns False when ``cancelled()`` becomes true first (the ticket leaves the line) or when
        ``timeout`` seconds pass (the ticket keeps its place: call again).
        """
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self.join(ticket)
            while True:
                if cancelled():
                    if ticket in self._waiting:
                        self._waiting.remove(ticket)
                    self._cond.notify_all()
                    return False
                if len(self._running) < self.slots and self._waiting and self._waiting[0] is ticket:
                    self._waiting.pop(0)
                    self._running.append(ticket)
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                self._cond.wait(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))

    def release(self, ticket: Any) -> None:
        """The ticket's training ended (or it left the queue): the next one may start."""
        with self._cond:
            for line in (self._running, self._waiting):
                if ticket in line:
                    line.remove(ticket)
            self._cond.notify_all()

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def position(self, ticket: Any) -> tuple[int, int] | None:
        """``(position, waiting)``: 1 is next to start; None when the ticket is not waiting."""
        with self._cond:
            if ticket not in self._waiting:
                return None
            return self._waiting.index(ticket) + 1, len(self._waiting)

    def ahead(self, ticket: Any) -> list[Any]:
        """The tickets that train before ``ticket``: the running ones, then those waiting in front."""
        with self._cond:
            front = self._waiting[:self._waiting.index(ticket)] if ticket in self._waiting else []
            return list(self._running) + front

    def start_in_s(self, ticket: Any) -> float | None:
        """Seconds until ``ticket`` can start (sum of the remaining times ahead), None when unknown."""
        total = 0.0
        for other in self.ahead(ticket):
            left = other.remaining_s()
            if left is None:
                return None
            total += max(0.0, left)
        return total

    def describe(self, ticket: Any) -> str:
        """``"position 2 of 3, starts in about 4 min"`` for a waiting ticket ("" when it is not waiting)."""
        where = self.position(ticket)
        if where is None:
            return ""
        pos, n = where
        wait = self.start_in_s(ticket)
        if wait is None:
            when = "start time unknown (a training ahead has no time estimate)"
        elif wait < 60:
            when = "starts in under a minute"
        elif wait < 5400:
            when = f"starts in about {round(wait / 60)} min"
        else:
            when = f"starts in about {wait / 3600:.1f} h"
        return f"position {pos} of {n}, {when}"


QUEUE = TrainingQueue()  # the one queue of this process (module global: shared by every visitor on purpose)


class Ticket:
    """A queue place for work that is not a ``Job`` (a paper claim re-run): no time estimate."""

    def remaining_s(self) -> float | None:
        return None


def queued_event(fn: Callable[..., Iterator[tuple]], n_outputs: int, queue: TrainingQueue = QUEUE):
    """Wrap a streaming event handler so that it runs only while it holds a slot of ``queue``.

    While it waits, its first output shows the position (refreshed every 2 s); the others are left as
    they are. The slot is released however the handler ends (finished, an error, Stop, a closed page).
    """
    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[tuple]:
        ticket = Ticket()
        try:
            while not queue.acquire(ticket, timeout=2.0):
                yield (f"<b>Waiting</b> in the training queue: {queue.describe(ticket)}.",
                       *(gr.skip() for _ in range(n_outputs - 1)))
            yield from fn(*args, **kwargs)
        finally:
            queue.release(ticket)

    return wrapper
