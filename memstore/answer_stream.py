"""Answers go to the model through a bounded queue, first come first served: up to `concurrent`
answers are generated at once (their decoding steps run as one batch: model.batching), the rest
wait their turn. Each answer runs in a thread of its own and comes out as a stream of events,
what the HTTP API's /ask/stream and the OpenAI-compatible stream both send in their own formats;
/ask waits for the last event. A client that goes away stops its answer at the next token, and
every answer has a time limit."""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator

import anyio

from memstore.errors import AnswerTimeoutError, BusyError, InvalidInputError, MemstoreError
from memstore.settings import CONCURRENT_ANSWERS, WAITING

log = logging.getLogger("memstore.server")

# reported with its own message (and its own HTTP status); anything else is an internal error
USER_ERRORS = (MemstoreError,)
TIME_LIMIT_S = 300  # an answer still generating after this long is stopped


class Cancelled(BaseException):
    """The client went away: the answer stops (a BaseException, so no `except Exception` keeps it going)."""


class AnswerQueue:
    """First come first served at the model: `concurrent` answers at once, at most `waiting` behind them."""

    def __init__(self, waiting: int = WAITING, time_limit_s: float = TIME_LIMIT_S, concurrent: int = CONCURRENT_ANSWERS):
        if concurrent < 1:
            raise InvalidInputError(f"concurrent answers must be at least 1, not {concurrent}")
        self.waiting, self.time_limit_s, self.concurrent = waiting, time_limit_s, concurrent
        self.finished: deque = deque(maxlen=32)  # the latest answers: {"outcome", "tokens"}
        self._line: deque = deque()  # tickets; the first `concurrent` ones' answers are being generated
        self._changed = threading.Condition()

    def busy(self) -> bool:
        return bool(self._line)

    def join(self) -> object:
        """A place in the line (its ticket), or BusyError when the line is full."""
        ticket = object()
        with self._changed:
            if len(self._line) >= self.waiting + self.concurrent:
                raise BusyError(f"{len(self._line)} answers are ahead; try again in a few seconds")
            self._line.append(ticket)
        return ticket

    @contextlib.contextmanager
    def turn(self, ticket: object, on_place=None, cancelled: threading.Event | None = None):
        """Wait for the ticket's turn (on_place(n): n answers ahead, when that changes): until fewer than
        `concurrent` answers ahead of it are still in the line."""
        try:
            with self._changed:
                told = None
                while (ahead := self._line.index(ticket)) >= self.concurrent:
                    if on_place and ahead != told:
                        on_place(told := ahead)
                    if cancelled is not None and cancelled.is_set():
                        raise Cancelled
                    self._changed.wait(0.5)
            yield
        finally:
            with self._changed:
                self._line.remove(ticket)
                self._changed.notify_all()


class AnswerJob:
    """One answer, started at once in its own thread with a place in the queue: events() yields
    ("queued", n ahead), ("status", text), ("token", text), then ("answer", Answer) or ("error", message)."""

    def __init__(self, memory, answers: AnswerQueue, question: str, **ask_kwargs):
        self.ticket = answers.join()  # BusyError here, before any response has started
        self.answers, self.memory, self.question, self.ask_kwargs = answers, memory, question, ask_kwargs
        self.cancel = threading.Event()
        self._events: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, daemon=True, name="answer").start()

    def _work(self) -> None:
        put, tokens, outcome = self._events.put, 0, "answered"
        try:
            with self.answers.turn(self.ticket, lambda n: put(("queued", n)), self.cancel):
                put(("status", "answering"))
                deadline = time.monotonic() + self.answers.time_limit_s

                def on_token(text: str) -> None:
                    nonlocal tokens
                    if self.cancel.is_set():
                        raise Cancelled
                    if time.monotonic() > deadline:
                        raise AnswerTimeoutError(f"the answer took over {self.answers.time_limit_s:.0f} s and was stopped")
                    tokens += 1
                    put(("token", text))

                put(("answer", self.memory.ask(self.question, on_token=on_token, **self.ask_kwargs)))
        except Cancelled:
            outcome = "cancelled"
            log.info("a client went away; its answer was stopped")
        except USER_ERRORS as e:
            outcome = "timed out" if isinstance(e, AnswerTimeoutError) else "refused"
            put(("error", e))
        except Exception as e:  # noqa: BLE001 - reported to the client as an event, logged here
            outcome = "failed"
            log.exception("answering %r failed", self.question)
            put(("error", f"internal error ({type(e).__name__}); see the server log"))
        finally:
            self.answers.finished.append({"outcome": outcome, "tokens": tokens})
            put(None)

    def events(self) -> Iterator[tuple[str, object]]:
        """The answer's events; leaving early stops the answer."""
        try:
            while (event := self._events.get()) is not None:
                yield event
        finally:
            self.cancel.set()

    async def stream(self) -> AsyncIterator[tuple[str, object]]:
        """events() for a streamed response: when the client goes away the server cancels the stream
        at its next event, and the answer stops at the token after."""
        try:
            while (event := await anyio.to_thread.run_sync(self._events.get, abandon_on_cancel=True)) is not None:
                yield event
        finally:
            self.cancel.set()

    def result(self):
        """The Answer, or the answer's error raised here (for a route that returns JSON)."""
        for kind, value in self.events():
            if kind == "answer":
                return value
            if kind == "error":
                raise value if isinstance(value, MemstoreError) else RuntimeError(value)
        raise RuntimeError("the answer ended without a result")
