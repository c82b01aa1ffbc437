"""One answer, generated in a thread under the model lock, as a stream of events: what the
HTTP API's /ask/stream and the OpenAI-compatible stream both send, each in its own format."""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator

from memstore.errors import MemstoreError

log = logging.getLogger("memstore.server")

# reported with its own message (and its own HTTP status); anything else is an internal error
USER_ERRORS = (MemstoreError,)


def answer_events(memory, lock: threading.Lock, question: str, **ask_kwargs) -> Iterator[tuple[str, object]]:
    """("status", text) while waiting for the lock and when answering starts, ("token", text) per
    piece of the answer, then ("answer", Answer) or ("error", message); a failure is logged here."""
    events: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            if lock.locked():
                events.put(("status", "waiting for the answer before this one"))
            with lock:
                events.put(("status", "answering"))
                events.put(("answer", memory.ask(question, on_token=lambda t: events.put(("token", t)), **ask_kwargs)))
        except USER_ERRORS as e:
            events.put(("error", str(e)))
        except Exception as e:  # noqa: BLE001 - reported to the client as an event, logged here
            log.exception("answering %r failed", question)
            events.put(("error", f"internal error ({type(e).__name__}); see the server log"))
        finally:
            events.put(None)

    threading.Thread(target=work, daemon=True, name="answer").start()
    while (event := events.get()) is not None:
        yield event
