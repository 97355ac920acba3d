"""Three stages over a sequence of items, overlapped on threads: read ahead, compute, write behind.

:func:`run_stages` calls ``read(item)``, ``compute(read_result)`` and ``write(computed)`` for every
item, in order. Overlapped (the default), ``read`` runs in a reader thread that stays at most
``depth`` items ahead, ``compute`` in the calling thread and ``write`` in a writer thread at most
``depth`` items behind, each stage on one item at a time and in item order: while the model restores
image *n* in the calling thread, image *n + 1* is being decoded from disk and image *n − 1* encoded
and written. torch operators and PIL's decoders and encoders release the GIL, so the stages use
different cores. Not overlapped, the same three calls run one after the other in the calling thread
(the sequential reference, and what to use when the stages must not share the machine).

Errors: the stages handle the errors they mean to survive themselves (e.g. one unreadable file);
any exception that leaves a stage stops the pipeline — the other stages finish the items already
handed to them, nothing new is read — and the first one is raised again in the caller.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable

__all__ = ["DEFAULT_DEPTH", "run_stages"]

#: Items a stage may run ahead of the next one (bounded memory: about 2·depth + 3 items in flight).
DEFAULT_DEPTH = 2
_END = object()            # marks the end of a queue's items
_POLL_S = 0.1              # how often a waiting stage checks whether another one failed


def run_stages(items: Iterable[Any], read: Callable[[Any], Any], compute: Callable[[Any], Any],
               write: Callable[[Any], None], *, overlap: bool = True, depth: int = DEFAULT_DEPTH) -> None:
    """``write(compute(read(item)))`` for each item, in order; overlapped on threads unless ``overlap``
    is False (module docstring).

    Raises:
        ValueError: ``depth`` < 1.
        BaseException: the first exception raised by a stage, after the other stages have stopped.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth!r}")
    if not overlap:
        for item in items:
            write(compute(read(item)))
        return
    stop = threading.Event()
    errors: list[BaseException] = []
    ahead: queue.Queue = queue.Queue(depth)
    behind: queue.Queue = queue.Queue(depth)

    def put(q: queue.Queue, value: Any) -> bool:
        """Hand ``value`` on; False (dropped) once the pipeline is stopping."""
        while not stop.is_set():
            try:
                q.put(value, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def get(q: queue.Queue) -> Any:
        """The next value, or ``_END`` at the end or when stopping with nothing left waiting."""
        while True:
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                if stop.is_set():
                    return _END

    def guarded(body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except BaseException as err:       # re-raised in the caller
                errors.append(err)
                stop.set()
        return run

    def reader() -> None:
        for item in items:
            if stop.is_set() or not put(ahead, read(item)):
                return
        put(ahead, _END)

    def computer() -> None:
        while (value := get(ahead)) is not _END:
            if not put(behind, compute(value)):
                return

    def writer() -> None:
        while (value := get(behind)) is not _END:
            write(value)

    threads = [threading.Thread(target=guarded(reader), name="dmdiff-read", daemon=True),
               threading.Thread(target=guarded(writer), name="dmdiff-write", daemon=True)]
    for thread in threads:
        thread.start()
    try:
        guarded(computer)()
    finally:
        put(behind, _END)
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
