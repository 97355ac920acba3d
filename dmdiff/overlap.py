"""Three stages over a sequence of items, overlapped on threads: read ahead, compute, write behind.

:func:`run_stages` calls ``read(item)``, ``compute(read_result)`` and ``write(computed)`` for every
item. Overlapped (the default), ``read`` runs in a reader thread that stays at most ``depth`` items
ahead of the computing, ``compute`` in the calling thread and ``write`` in a writer thread, which
takes the computed items in item order: while the model restores image *n* in the calling thread,
image *n + 1* is being decoded from disk and image *n − 1* encoded and written. torch operators and
PIL's decoders and encoders release the GIL, so the stages use different cores.

``compute`` may also be a sequence of callables, one per compute thread (e.g. one copy of a model
each): the calling thread runs the first, one more thread each of the others, and every thread takes
the next item read as soon as it is free, so items are computed out of order while ``read`` and
``write`` still see them in order. Computed items wait for the writer at most ``depth`` per compute
thread beyond the one it needs next.

Not overlapped, the three calls run one after the other in the calling thread with the first
``compute`` (the sequential reference, and what to use when the stages must not share the machine).

Errors: the stages handle the errors they mean to survive themselves (e.g. one unreadable file);
any exception that leaves a stage stops the pipeline — the other stages finish the items already
handed to them, nothing new is read, the writer stops at the first item that was not computed —
and the first one is raised again in the caller.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Sequence

__all__ = ["DEFAULT_DEPTH", "run_stages"]

#: Items a stage may run ahead of the next one (bounded memory: about 2·depth + 3 items in flight
#: with one compute thread, (depth + 1)·(threads + 1) + 2 with several).
DEFAULT_DEPTH = 2
_END = object()            # marks the end of a queue's items
_POLL_S = 0.1              # how often a waiting stage checks whether another one failed


def run_stages(items: Iterable[Any], read: Callable[[Any], Any],
               compute: Callable[[Any], Any] | Sequence[Callable[[Any], Any]],
               write: Callable[[Any], None], *, overlap: bool = True, depth: int = DEFAULT_DEPTH) -> None:
    """``write(compute(read(item)))`` for each item, written in order; overlapped on threads unless
    ``overlap`` is False, with one compute thread per callable when ``compute`` is a sequence
    (module docstring).

    Raises:
        ValueError: ``depth`` < 1, or an empty sequence of ``compute`` callables.
        BaseException: the first exception raised by a stage, after the other stages have stopped.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth!r}")
    computes = list(compute) if isinstance(compute, Sequence) else [compute]
    if not computes:
        raise ValueError("run_stages needs at least one compute callable")
    if not overlap:
        for item in items:
            write(computes[0](read(item)))
        return
    stop = threading.Event()
    errors: list[BaseException] = []
    ahead: queue.Queue = queue.Queue(depth)
    computed: dict[int, Any] = {}         # item index → computed value, until written
    ready = threading.Condition()         # guards `computed`, `next_write` and `working`
    next_write = 0                        # the index of the next item to write
    working = len(computes)               # compute threads still running
    ahead_limit = depth * len(computes)   # how far beyond `next_write` a computed item may wait

    def put(value: Any) -> bool:
        """Hand ``value`` to the compute threads; False (dropped) once the pipeline is stopping."""
        while not stop.is_set():
            try:
                ahead.put(value, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def get() -> Any:
        """The next value read, or ``_END`` at the end or when stopping with nothing left waiting."""
        while True:
            try:
                return ahead.get(timeout=_POLL_S)
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
        for index, item in enumerate(items):
            if stop.is_set() or not put((index, read(item))):
                return
        for _ in computes:
            put(_END)

    def computer(fn: Callable[[Any], Any]) -> Callable[[], None]:
        def body() -> None:
            nonlocal working
            try:
                while (value := get()) is not _END:
                    index, read_value = value
                    result = fn(read_value)
                    with ready:
                        # the item the writer needs next never waits, so neither does anything before it
                        while index - next_write > ahead_limit and not stop.is_set():
                            ready.wait(_POLL_S)
                        computed[index] = result
                        ready.notify_all()
            finally:
                with ready:
                    working -= 1
                    ready.notify_all()
        return body

    def writer() -> None:
        nonlocal next_write
        while True:
            with ready:
                while next_write not in computed:
                    if not working:
                        return
                    ready.wait(_POLL_S)
                value = computed.pop(next_write)
            write(value)
            with ready:
                next_write += 1
                ready.notify_all()

    threads = [threading.Thread(target=guarded(reader), name="dmdiff-read", daemon=True),
               threading.Thread(target=guarded(writer), name="dmdiff-write", daemon=True)]
    threads += [threading.Thread(target=guarded(computer(fn)), name=f"dmdiff-compute-{i}", daemon=True)
                for i, fn in enumerate(computes[1:], start=1)]
    for thread in threads:
        thread.start()
    try:
        guarded(computer(computes[0]))()
    finally:
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
