"""The SD-Turbo-scale switches on the CPU code path (docs/scaling.md): gradient checkpointing gives
the gradients of a plain backward pass (modulated LoRA included), bf16 mixed precision reaches the
model's forward pass in a training step, configs/sd-turbo.yaml turns both on, and `dmdiff bench gpu`
without CUDA."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_dmdiff import _maps, make_model  # noqa: E402
from test_train import tiny, write_dataset  # noqa: E402

from dmdiff.bench.gpu import train_benchmark  # noqa: E402
from dmdiff.cli import main as cli_main  # noqa: E402
from dmdiff.config import CONFIGS  # noqa: E402
from dmdiff.train.config import load_train_config  # noqa: E402
from dmdiff.train.data import StepBatches  # noqa: E402
from dmdiff.train.loop import LossStats, build_session, train_step  # noqa: E402
from dmdiff.train.rundir import config_differences  # noqa: E402


def gradients(model, paths=("positive", "negative")) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The trained parameters' gradients of one loss on a fixed batch, and the output."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for p in model.trainable_parameters().values():
        p.grad = None
    y = model(x, _maps(2), list(paths))
    y.square().mean().backward()
    return {k: p.grad.clone() for k, p in model.trainable_parameters().items() if p.grad is not None}, y.detach()


@pytest.mark.parametrize("spatial", [False, True])
def test_gradient_checkpointing_keeps_the_gradients(spatial):
    """The blocks are recomputed in the backward pass after the forward pass has restored the LoRA
    modulation; they must see the forward pass's matrices again (else other activations, other
    gradients — torch even refuses: another number of saved tensors)."""
    model = make_model(svda_spatial=spatial).train()
    plain, y_plain = gradients(model)
    recomputed = []
    model.unet.down_blocks[1].resnets[0].register_forward_pre_hook(lambda *_: recomputed.append(1))
    model.enable_gradient_checkpointing()
    checkpointed, y_checkpointed = gradients(model)
    assert len(recomputed) == 2                       # the forward pass and its recomputation
    assert torch.equal(y_plain, y_checkpointed)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(model.trainable_parameters())
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)      # same kernels on the CPU: bit for bit
    assert any(plain[k].abs().max() > 0 for k in plain if ".lora_A." in k)


def test_bf16_and_checkpointing_reach_the_training_step(tmp_path):
    """With `mixed_precision: bf16` the UNet computes in bfloat16 inside the training step (accelerate's
    autocast around the prepared model); the trained weights, their gradients and the optimizer stay
    float32; with `gradient_checkpointing` the UNet's blocks run again in the backward pass."""
    data = write_dataset(tmp_path / "data")
    cfg = load_train_config(tiny(data, mixed_precision="bf16", gradient_checkpointing=True, grad_accum=1,
                                 ema_decay=None, threads=1))
    build_session(replace(cfg, mixed_precision="no"), tmp_path / "run", None)   # accelerate keeps one per process
    session = build_session(cfg, tmp_path / "run", None)                     # unless each run resets it
    dtypes, block_calls = [], []
    session.model.unet.conv_in.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    session.model.unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *_: block_calls.append(1))
    before = {k: p.detach().clone() for k, p in session.params.items()}
    batch = StepBatches(session.sets, cfg, cfg.steps)[0]
    train_step(session, iter([batch]), cfg.lr, 0, LossStats(session.accelerator.device, session.term_names))
    assert dtypes == [torch.bfloat16] and len(block_calls) == 2
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in session.params.values())
    assert sum(not torch.equal(before[k], p) for k, p in session.params.items()) > len(before) // 2
    moments = [s["exp_avg"] for s in session.optimizer.state_dict()["state"].values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)


def test_sd_turbo_config_turns_both_on_and_checkpointing_may_change_on_resume():
    cfg = load_train_config(CONFIGS / "sd-turbo.yaml")
    assert cfg.gradient_checkpointing and cfg.mixed_precision == "bf16"
    assert config_differences(cfg, load_train_config(CONFIGS / "sd-turbo.yaml", gradient_checkpointing=False)) == []
    assert config_differences(cfg, load_train_config(CONFIGS / "sd-turbo.yaml", mixed_precision="no")) == [
        "mixed_precision"]


def test_bench_gpu_training_part_runs_the_sd_turbo_config():
    """The training measurement of `dmdiff bench gpu`, on the CPU with the tiny backbone: the
    sd-turbo config's switches on, a synthetic dataset, the figures it reports."""
    r = train_benchmark("cpu", 64, 2, True, "bf16", 1, 1, "tiny")
    assert (r["gradient_checkpointing"], r["mixed_precision"], r["batch_size"], r["steps"], r["size"]) == (
        True, "bf16", 1, 2, 64)
    assert 0 < r["step_s"] < r["wall_s"] and r["peak_bytes"] > 0 and r["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_bench_gpu_without_cuda_says_so_and_exits_cleanly(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert cli_main(["bench", "gpu", "--out", str(out)]) == 0
    assert "CUDA is not available" in capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["format"] == "dmdiff-bench-gpu" and record["cuda"] is False and "not available" in record["reason"]
    assert not [p for p in tmp_path.iterdir() if p != out]                 # no temporary file left
    assert cli_main(["bench", "gpu"]) == 0 and not [p for p in tmp_path.iterdir() if p != out]
    assert cli_main(["bench", "gpu", "--train-steps", "0"]) == 2
