"""dmdiff.overlap: three stages over items, overlapped on threads, in order, errors raised in the caller."""

import threading
import time

import pytest

from dmdiff.overlap import run_stages


def _recording(n, overlap, depth=2, slow=0.0):
    """Run n items through stages that record (stage, item, thread) events; returns the events and
    the written items."""
    events, written = [], []
    lock = threading.Lock()

    def note(stage, item):
        with lock:
            events.append((stage, item, threading.current_thread().name))

    def read(i):
        note("read", i)
        return i * 10

    def compute(x):
        note("compute", x // 10)
        time.sleep(slow)
        return x + 1

    def write(y):
        note("write", (y - 1) // 10)
        written.append(y)

    run_stages(range(n), read, compute, write, overlap=overlap, depth=depth)
    return events, written


@pytest.mark.parametrize("overlap", [True, False])
def test_every_item_goes_through_the_three_stages_in_order(overlap):
    events, written = _recording(12, overlap)
    assert written == [i * 10 + 1 for i in range(12)]
    for stage in ("read", "compute", "write"):
        assert [item for s, item, _ in events if s == stage] == list(range(12))
    threads = {stage: {t for s, _, t in events if s == stage} for stage in ("read", "compute", "write")}
    main = threading.current_thread().name
    assert threads["compute"] == {main}
    if overlap:
        assert threads["read"] == {"dmdiff-read"} and threads["write"] == {"dmdiff-write"}
    else:
        assert threads["read"] == threads["write"] == {main}


def test_the_reader_stays_a_bounded_number_of_items_ahead():
    events, _ = _recording(20, True, depth=2, slow=0.01)
    computed = 0
    for stage, item, _ in events:
        if stage == "compute":
            computed = item + 1
        if stage == "read":
            # one item in compute's hands, `depth` waiting, one being read
            assert item <= computed + 2 + 1


def test_an_error_in_a_stage_stops_the_run_and_is_raised_in_the_caller():
    written, read = [], []

    def failing_write(y):
        if y == 3:
            raise OSError(28, "No space left on device")
        written.append(y)

    with pytest.raises(OSError, match="No space"):
        run_stages(range(1000), lambda i: read.append(i) or i, lambda x: x, failing_write)
    assert written == [0, 1, 2] and len(read) < 20                  # stopped reading soon after

    done = []

    def failing_compute(x):
        if x == 5:
            raise KeyError("model")
        return x

    with pytest.raises(KeyError):
        run_stages(range(1000), lambda i: i, failing_compute, done.append)
    assert done == [0, 1, 2, 3, 4]                       # what was computed before is still written
    with pytest.raises(ValueError, match="depth"):
        run_stages([], lambda i: i, lambda x: x, lambda y: None, depth=0)
    assert not [t for t in threading.enumerate() if t.name.startswith("dmdiff-")]      # no thread left behind
