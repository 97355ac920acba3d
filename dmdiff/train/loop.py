"""``dmdiff train``: multipath training of DMDiff on accelerate (DESIGN §2, §5).

One loop for a CPU process and for ``accelerate launch`` on several GPUs: ``Accelerator`` does the
device placement, DDP wrapping (:meth:`~accelerate.Accelerator.prepare`), gradient accumulation
(:meth:`~accelerate.Accelerator.accumulate`), mixed precision and clipping; only the main process
writes files. Each optimizer step trains ``grad_accum`` micro-batches of ``batch_size`` crops per
process; every micro-batch is a pure function of ``(seed, index)`` (:mod:`dmdiff.train.data`), so
``--resume latest`` continues bit for bit: the weights after a resumed run equal those of an
uninterrupted one (same machine, same number of processes; on GPUs only as far as the kernels are
deterministic, which cuDNN's are not by default). Checkpoints are our own safetensors +
JSON folders (:mod:`dmdiff.train.checkpoint`); see :mod:`dmdiff.train.rundir` for the run folder.

Validation (every ``validate_every`` steps and at the end): the positive path (or, when it is not
trained, the most trained path: stage 1's negative one) on the first ``val_images`` test pairs of
``data`` (centre crops), outputs clipped and rounded to 8 bits like saved images, PSNR / SSIM
(RGB, :mod:`dmdiff.metrics`) against the path's target, next to the input's own PSNR / SSIM
against it. With EMA, validation and the exported ``RUN/pipeline/`` use the EMA weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path
from statistics import median
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from dmdiff.errors import DmdiffError, RunFault
from dmdiff.outputs import write_json
from dmdiff.weights import load_safetensors
from dmdiff.train import checkpoint as ckpt_io
from dmdiff.train.config import PATH_IO, PATHS, TrainConfig, TrainWarning, check_device_support, load_train_config
from dmdiff.train.data import StepBatches, open_train_sets, validation_pairs
from dmdiff.train.ema import EMA
from dmdiff.train.losses import MultipathLoss
from dmdiff.train.rundir import PIPELINE, REPORT, MetricsLog, check_run, write_run_info


def _load_init_weights(model, source: str) -> None:
    """``init_weights``: a run folder (its ``pipeline/``), a pipeline folder or a safetensors file of
    ``DMDiff.trainable_state_dict()``."""
    from dmdiff.model.pipeline import TRAINABLE_FILE

    path = Path(source)
    for candidate in (path / PIPELINE / TRAINABLE_FILE, path / TRAINABLE_FILE, path):
        if candidate.is_file():
            model.load_trainable_state_dict(load_safetensors(candidate))
            return
    raise DmdiffError(f"init_weights: {source} is neither a finished run folder, a pipeline folder nor a "
                      "safetensors file")


def _load_params(params: dict, weights: dict, where: Path) -> None:
    """Copy checkpoint tensors into the trained parameters (names and shapes must match)."""
    bad = sorted(set(params) ^ set(weights)) + sorted(k for k in params.keys() & weights.keys()
                                                      if params[k].shape != weights[k].shape)
    if bad:
        raise DmdiffError(f"{where} does not fit this model ({len(bad)} tensors differ in name or shape, "
                          f"e.g. {bad[:3]}); was it written with another model config?")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(weights[k])


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _quantised(x: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` → ``(B, H, W, 3)`` float64, clipped and rounded to 8-bit levels."""
    return (x.float().clamp(0, 1).mul(255).round().div(255)).permute(0, 2, 3, 1).cpu().double().numpy()


def validation_path(cfg: TrainConfig) -> str:
    """The path validated: positive when it is trained, else the most trained one (stage 1: negative)."""
    probs = cfg.path_probs.normalised()
    return "positive" if probs[0] > 0 else PATHS[int(np.argmax(probs))]


@torch.no_grad()
def validate(model, pairs: list[dict], path: str, accelerator, batch_size: int) -> dict[str, float]:
    """Mean PSNR/SSIM of ``path``'s output against its target (``psnr``, ``ssim``) and of its input
    against the target (``psnr_input``, ``ssim_input``) over ``pairs``, each process taking every
    ``world``-th pair; empty without pairs. Inputs/targets as in training (:mod:`dmdiff.train.data`)."""
    from accelerate.utils import gather_object

    from dmdiff.metrics import psnr, ssim

    source, reference = PATH_IO[path]
    mine = pairs[accelerator.process_index::accelerator.num_processes]
    rows = []
    with _eval_mode(model), torch.random.fork_rng(devices=[]), accelerator.autocast():
        for i in range(0, len(mine), batch_size):
            chunk = mine[i:i + batch_size]
            x = torch.stack([p[source] for p in chunk]).to(accelerator.device)
            target = torch.stack([p.get(reference, p["gt"]) for p in chunk])
            maps = torch.stack([p["maps"] for p in chunk]).to(accelerator.device) if "maps" in chunk[0] else None
            out, ref, inp = _quantised(model(x, maps, path)), _quantised(target), _quantised(x)
            for o, r, x_ in zip(out, ref, inp):
                rows.append({"psnr": psnr(o, r), "ssim": ssim(o, r), "psnr_input": psnr(x_, r),
                             "ssim_input": ssim(x_, r)})
    rows = gather_object(rows) if accelerator.num_processes > 1 else rows
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def _restore(state: ckpt_io.Checkpoint, model, params: dict, optimizer, ema: EMA | None, accelerator) -> int:
    """Load a checkpoint into the training state (weights, optimizer, EMA, grad scaler, generators);
    returns its step.

    Raises:
        DmdiffError: the checkpoint does not fit, or was trained on another base backbone (e.g. the
            shipped tiny backbone appeared or changed since).
    """
    saved = state.state["extra"].get("backbone")
    if saved is not None and saved != model.backbone.source:
        raise DmdiffError(f"{state.path} was trained on the backbone {saved!r}, but this model loads "
                          f"{model.backbone.source!r}; resuming would mix them (start a new run)")
    if state.state["world_size"] != accelerator.num_processes:
        warnings.warn(f"{state.path} was written by {state.state['world_size']} process(es), this run has "
                      f"{accelerator.num_processes}: the data order from here on differs from the original "
                      "run's", TrainWarning, stacklevel=3)
    _load_params(params, state.model, state.path)
    optimizer.load_state_dict(state.optimizer)
    if ema is not None:
        if state.ema is None:
            raise DmdiffError(f"{state.path} has no EMA weights but ema_decay is set")
        ema.load(state.ema)
    if accelerator.scaler is not None and state.state["extra"].get("scaler"):
        accelerator.scaler.load_state_dict(state.state["extra"]["scaler"])
    if state.rng is not None:
        ckpt_io.restore_rng(state.rng)
    return state.step


def _export(out: Path, model, params: dict, ema: EMA | None, report: dict) -> None:
    """Write ``RUN/pipeline/`` (EMA weights with EMA) and then ``train_report.json``, atomically."""
    from dmdiff.model.pipeline import DMDiffPipeline

    with ema.applied(params) if ema else contextlib.nullcontext():
        DMDiffPipeline.from_model(model).save_pretrained(out / PIPELINE, overwrite=True)
    write_json(out / REPORT, report)


#: ``on_log(step, record)``: called with each record written to ``metrics.jsonl``.
LogCallback = Callable[[int, dict], None]


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The lr of optimizer step ``step`` (0-based): linear warm-up over ``cfg.warmup_steps``, then
    ``cfg.lr`` (``lr_schedule: constant``) or a cosine decay from ``cfg.lr`` to 0 at ``cfg.steps``."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    if cfg.lr_schedule == "cosine" and step >= cfg.warmup_steps:
        lr *= 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)))
    return lr


def train(cfg: TrainConfig, out: str | Path, resume: str | None = None, *, progress: bool = True,
          stop_at_step: int | None = None, command: str = "dmdiff train", on_log: LogCallback | None = None) -> dict:
    """Train DMDiff with ``cfg`` into the run folder ``out`` (with ``cfg.threads`` torch threads,
    restored afterwards).

    Args:
        cfg: the settings (validated again here).
        out: the run folder (created; see :mod:`dmdiff.train.rundir`).
        resume: None (a new run; ``out`` must not hold one), ``"latest"`` (continue from the newest
            good checkpoint, or start when there is none) or a checkpoint folder.
        progress: show a tqdm bar.
        stop_at_step: stop after this step without finishing the run, as a kill would (tests).
        command: recorded in ``run.json``.
        on_log: called on the main process as ``on_log(step, record)`` right after each record is
            appended to ``metrics.jsonl`` (training and validation records, as written; a copy, so
            the callback may keep it), e.g. to draw a live loss plot
            (:class:`dmdiff.viz.TrainingMonitor`). It runs inside the training loop: keep it fast;
            an exception it raises stops the run like a kill would (resume with ``"latest"``).

    Returns:
        The ``train_report.json`` record (``completed`` False when stopped early).

    Raises:
        DmdiffError: bad data, an existing run without ``resume``, a checkpoint that does not fit.
            All checks on data and folders run before the first step.
    """
    with torch_threads(cfg.threads):
        return _train(cfg, Path(out), resume, progress, stop_at_step, command, on_log)


def anchor_psf(cfg: TrainConfig):
    """The PSF a deconvolved colour anchor (``model.anchor_rl_iterations``) uses: the central PSF of the
    lens of ``cfg.data`` (its ``lens.json``), ``(3, K, K)``.

    Raises:
        DmdiffError: ``cfg.data`` has no lens spec (real captures): there is no PSF to deconvolve with.
    """
    from dmdiff.baselines import dataset_central_psf

    psf, _, reason = dataset_central_psf(cfg.data)
    if psf is None:
        raise DmdiffError(f"model.anchor_rl_iterations: {reason}; set model.anchor_rl_iterations: null "
                          "to anchor to the capture itself")
    return psf


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch intra-op threads (None: unchanged); restored afterwards."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(cfg: TrainConfig, out: Path, resume: str | None, progress: bool, stop_at_step: int | None,
           command: str, on_log: LogCallback | None = None) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from dmdiff.model.dmdiff import DMDiff

    cfg.validate()
    check_device_support(cfg)
    check_run(out, cfg, resume)
    sets = open_train_sets(cfg)
    use_maps = sets[0].map_paths is not None
    val_pairs = validation_pairs(cfg, use_maps)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    set_seed(cfg.seed)
    model = DMDiff(cfg.model)
    if cfg.model.anchor_rl_iterations is not None:
        model.set_anchor_psf(anchor_psf(cfg))
    if cfg.init_weights:
        _load_init_weights(model, cfg.init_weights)
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=cfg.adam_betas,
                                  weight_decay=cfg.weight_decay)
    loss_fn = MultipathLoss(cfg.loss, accelerator.device)
    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay else None
    wrapped, optimizer = accelerator.prepare(model, optimizer)

    if main:
        write_run_info(out, cfg, resume, command)
        ckpt_io.clean_partial(out)
    accelerator.wait_for_everyone()
    state = ckpt_io.find_checkpoint(out, resume, rank) if resume else None
    start = _restore(state, model, params, optimizer, ema, accelerator) if state is not None else 0

    log = MetricsLog(out, start) if main else None
    n_micro = cfg.steps * cfg.grad_accum
    batches = StepBatches(sets, cfg, n_micro, rank, world)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start * cfg.grad_accum, n_micro),
                                         num_workers=cfg.num_workers, pin_memory=accelerator.device.type == "cuda")
    unwrapped = accelerator.unwrap_model(wrapped)
    val_path = validation_path(cfg)

    def save_checkpoint(step: int) -> None:
        folder = ckpt_io.partial_dir(out, step)
        try:
            if main:
                folder.mkdir(parents=True, exist_ok=True)
            accelerator.wait_for_everyone()
            ckpt_io.write_rng(folder, rank)
            accelerator.wait_for_everyone()
            if main:
                scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
                ckpt_io.write_checkpoint(folder, step, model=params, optimizer=optimizer.state_dict(),
                                         ema=ema.shadow if ema else None,
                                         samples_seen=step * cfg.grad_accum * cfg.batch_size * world,
                                         world_size=world, extra={"scaler": scaler, "backbone": model.backbone.source})
        except OSError as e:
            shutil.rmtree(folder, ignore_errors=True)
            kept = [p.name for _, p in ckpt_io.list_checkpoints(out)]
            raise RunFault(f"could not write the checkpoint of step {step} into {out} ({e.strerror or e}"
                           f"{': ' + str(e.filename) if e.filename else ''}); the unfinished checkpoint was "
                           f"removed and the run keeps {', '.join(kept) or 'no checkpoint yet'}. Free some "
                           "space and rerun with --resume latest") from None
        if main:
            ckpt_io.prune(out, cfg.keep_last)
        accelerator.wait_for_everyone()

    def write_log(record: dict) -> None:
        log.write(record)
        if on_log is not None:
            on_log(record["step"], json.loads(json.dumps(record)))

    def run_validation(step: int) -> dict:
        with ema.applied(params) if ema else contextlib.nullcontext():
            metrics = validate(unwrapped, val_pairs, val_path, accelerator, cfg.batch_size)
        if main and metrics:
            write_log({"step": step, "kind": "val", "path": val_path, **metrics})
        return metrics

    def path_zeros() -> torch.Tensor:
        return torch.zeros(len(PATHS), device=accelerator.device)

    step_times, last_val = [], {}
    totals: dict[str, torch.Tensor] = {}
    counts, n_logged = np.zeros(len(PATHS), dtype=np.int64), 0
    # per-path loss: summed over the micro-batches that trained one path only, and their number
    path_sum, path_n = path_zeros(), path_zeros()
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {out.name}", unit="step",
               disable=not (progress and main), file=sys.stderr)
    batch_iter = iter(loader)
    t_start = t_interval = time.perf_counter()
    for step in range(start, cfg.steps):
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(accelerator.device) for k, v in next(batch_iter).items()}
            path_ids = batch["path"].tolist()
            with accelerator.accumulate(wrapped):
                output = wrapped(batch["input"], batch.get("maps"), [PATHS[i] for i in path_ids])
                loss, terms = loss_fn(output, batch["target"])
                if not torch.isfinite(loss):
                    raise non_finite_loss(step + 1, loss, terms, [PATHS[i] for i in path_ids], out)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.grad_clip is not None:
                    accelerator.clip_grad_norm_(list(params.values()), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in {"loss": loss.detach(), **terms}.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
            counts += np.bincount(path_ids, minlength=len(PATHS))
            if len(set(path_ids)) == 1:
                path_sum[path_ids[0]] += loss.detach().float()
                path_n[path_ids[0]] += 1
        if ema is not None:
            ema.update(params)
        done, n_logged = step + 1, n_logged + 1
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            record = {k: accelerator.reduce(v, "mean").item() / n_logged for k, v in totals.items()}
            sums, ns = (accelerator.reduce(t, "sum").tolist() for t in (path_sum, path_n))
            record["path_loss"] = {p: s / n for p, s, n in zip(PATHS, sums, ns) if n}
            step_times.append((time.perf_counter() - t_interval) / n_logged)   # .item() synchronised
            t_interval = time.perf_counter()
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if main:
                write_log({"step": done, "kind": "train", **record, "lr": lr,
                           "paths": dict(zip(PATHS, counts.tolist())), "step_time_s": step_times[-1]})
            totals, counts, n_logged = {}, np.zeros(len(PATHS), dtype=np.int64), 0
            path_sum, path_n = path_zeros(), path_zeros()
        t_pause = time.perf_counter()                 # validation and checkpoints are not step time
        if cfg.val_images and ((cfg.validate_every and done % cfg.validate_every == 0) or done == cfg.steps):
            last_val = run_validation(done)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(done)
        if stop_at_step is not None and stop_at_step <= done < cfg.steps:
            bar.close()
            return {"completed": False, "steps": done}
        t_interval += time.perf_counter() - t_pause
    bar.close()
    if start >= cfg.steps and cfg.val_images:
        last_val = run_validation(cfg.steps)
    report = {"completed": True, "steps": cfg.steps, "resumed_from_step": start,
              "wall_s": round(time.perf_counter() - t_start, 2),
              "step_time_s": {"median": median(step_times), "mean": float(np.mean(step_times))} if step_times else None,
              "val": {"path": val_path, **last_val} if last_val else {}, "perceptual_term": loss_fn.perceptual,
              "loss_note": loss_fn.note, "processes": world, "device": str(accelerator.device)}
    if main:
        _export(out, model, params, ema, report)
    accelerator.wait_for_everyone()
    return report


def non_finite_loss(step: int, loss: torch.Tensor, terms: dict, paths: list[str], out: Path) -> RunFault:
    """The error for a NaN/Inf training loss at optimizer step ``step`` (1-based): what was computed
    and what to check. The checkpoints written so far are untouched."""
    detail = ", ".join(f"{k} {float(torch.as_tensor(v).detach()):.4g}" for k, v in terms.items())
    return RunFault(f"step {step}: the training loss is {loss.detach().item()} ({detail}; paths {', '.join(sorted(set(paths)))}). "
                    "Check the learning rate (lr, warmup_steps), the loss weights and the data (NaN or "
                    f"infinite pixels or maps); {out}'s earlier checkpoints are kept: fix the cause and "
                    "rerun, with --resume latest to continue from the last one")


def show_warnings(prog: str):
    """A ``warnings.showwarning`` that prints ``<prog>: warning: <message>`` (no source line)."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=sys.stderr)

    return show


def main(args) -> int:
    """Entry point of ``dmdiff train`` (args: config, recipe, out, resume, no_progress)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", TrainWarning)
        warnings.showwarning = show_warnings("dmdiff train")
        if args.recipe:
            from dmdiff.train.recipe import recipe_config_path, run_recipe

            path = recipe_config_path(args.recipe)
            out = Path(args.out or Path("runs") / path.stem)
            run_recipe(load_train_config(path), out, progress=not args.no_progress)
            print(f"dmdiff train: recipe done; final model in {out / 'stage2' / PIPELINE}")
            return 0
        cfg = load_train_config(args.config)
        out = Path(args.out or Path("runs") / Path(args.config).stem)
        report = train(cfg, out, args.resume, progress=not args.no_progress)
    val = report.get("val") or {}
    extra = f", val PSNR {val['psnr']:.2f} dB (input {val['psnr_input']:.2f} dB)" if val else ""
    print(f"dmdiff train: {report['steps']} steps in {report['wall_s']:.0f} s{extra}; model in {out / PIPELINE}")
    return 0
