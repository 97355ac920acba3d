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


def test_several_compute_threads_write_in_order_and_stay_bounded():
    """Two compute callables: each runs in its own thread, both take items, the writer still gets
    them in order although they finish out of order, and no computed item waits for the writer more
    than ``depth`` per compute thread beyond the one it needs next."""
    events, lock = [], threading.Lock()

    def note(stage, item):
        with lock:
            events.append((stage, item, threading.current_thread().name))

    def computer(delay):
        def compute(x):
            note("compute", x)
            time.sleep(delay(x))
            return x
        return compute

    written = []

    def write(y):
        note("write", y)
        time.sleep(0.002)
        written.append(y)

    # the calling thread is slow on even items, so odd ones overtake them in the other thread
    run_stages(range(30), lambda i: i, [computer(lambda x: 0.02 * (x % 2 == 0)), computer(lambda x: 0.0)],
               write, depth=2)
    assert written == list(range(30))
    threads = {t for s, _, t in events if s == "compute"}
    assert threading.current_thread().name in threads and "dmdiff-compute-1" in threads
    done, lowest_unwritten = set(), 0
    for stage, item, _ in events:
        if stage == "compute":
            assert item - lowest_unwritten <= 2 * 2 + 2      # computed ahead, plus the two in hand
        else:
            done.add(item)
            while lowest_unwritten in done:
                lowest_unwritten += 1


def test_an_error_in_one_of_several_compute_threads_stops_the_run():
    def failing(x):
        if x == 7:
            raise KeyError("copy")
        return x

    done = []
    with pytest.raises(KeyError):
        run_stages(range(1000), lambda i: i, [failing, failing], done.append)
    assert done == list(range(len(done))) and 7 not in done and len(done) < 20
    with pytest.raises(ValueError, match="at least one compute"):
        run_stages([1], lambda i: i, [], lambda y: None)
    assert not [t for t in threading.enumerate() if t.name.startswith("dmdiff-")]
