"""``dmdiff bench model``: its memory probe, its timings' bookkeeping, and the command (small sizes)."""

import mmap
import time

import pytest
import torch

from dmdiff import cli
from dmdiff.bench import model as bench


def _allocate_and_free(mib=64):
    """Make ``mib`` MiB resident and give it back: pages fresh from the kernel (an anonymous map), not
    from the allocator, which may hand out memory an earlier test freed but left resident."""
    block = mmap.mmap(-1, mib * 2 ** 20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1                           # touched pages: resident
    time.sleep(0.05)
    block.close()


def test_peak_memory_sees_a_freed_allocation():
    with bench.PeakMemory(torch.device("cpu")) as memory:
        _allocate_and_free()
    assert 60 * 2 ** 20 < memory.bytes < 200 * 2 ** 20


def test_peak_memory_falls_back_to_sampling(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "_HWM_RESET", tmp_path)      # a folder: writing fails as without clear_refs
    with bench.PeakMemory(torch.device("cpu")) as memory:
        _allocate_and_free()
    assert memory._sampler is not None and 60 * 2 ** 20 < memory.bytes < 200 * 2 ** 20


def test_restore_benchmark_reports_consistent_times():
    r = bench.restore_benchmark("tiny", 64, repeats=2, threads=1, anchored=True)
    assert set(r) == {"backbone", "build_s", "restore_s", "decode_s", "ratio", "peak_bytes", "peak_rss_bytes",
                      "stages_s", "anchor_s"}
    assert 0 < r["anchor_s"] < r["restore_s"]
    assert r["peak_rss_bytes"] >= r["peak_bytes"] >= 0 and r["peak_rss_bytes"] > 0
    assert set(r["stages_s"]) == set(bench.STAGES) and all(t > 0 for t in r["stages_s"].values())
    assert sum(r["stages_s"].values()) <= r["restore_s"] * 1.5    # medians of laps vs median of totals
    assert 0 < r["ratio"] == r["decode_s"] / r["restore_s"] < 1
    previous = bench.restore_benchmark("tiny", 64, repeats=1, threads=1, layout=bench.PREVIOUS_TINY_LAYOUT)
    assert previous["backbone"] == "random-init" and previous["restore_s"] > 0 and previous["anchor_s"] == 0


@pytest.mark.slow
def test_command_prints_the_table(capsys):
    assert cli.main(["bench", "model", "--sizes", "64", "--repeats", "1", "--no-sd-turbo-shape"]) == 0
    out = capsys.readouterr().out
    assert "tiny preset" in out and "64×64" in out and "restore time by stage" in out and "colour anchor" in out
    assert "previous" in out and "speed-up" in out and "target" not in out      # no target size measured
    assert cli.main(["bench", "model", "--sizes", "32"]) == 2                  # below the warm-up size
