"""Multipath training of DMDiff on accelerate (``dmdiff train``; the paths: docs/architecture.md).

One loop for a CPU process and for ``accelerate launch`` on several GPUs or CPU processes
(docs/scaling.md): ``Accelerator`` does the device placement, DDP wrapping
(:meth:`~accelerate.Accelerator.prepare`), gradient accumulation
(:meth:`~accelerate.Accelerator.accumulate`), mixed precision and clipping; only the main process
writes files. Each optimizer step trains ``grad_accum`` micro-batches of ``batch_size`` crops per
process; every micro-batch is a pure function of ``(seed, index)`` (:mod:`dmdiff.train.data`), so
``--resume latest`` continues bit for bit: the weights after a resumed run equal those of an
uninterrupted one (same machine, same number of processes; on GPUs only as far as the kernels are
deterministic, which cuDNN's are not by default). Checkpoints are our own safetensors +
JSON folders (:mod:`dmdiff.train.checkpoint`); see :mod:`dmdiff.runs` for the run folder.

:func:`train` reads top to bottom: build, resume, the data, the loop (a step, then logging,
validation and checkpoints), the end; the helpers it calls are the functions above it.

Validation (every ``validate_every`` steps and at the end): the positive path (or, when it is not
trained, the most trained path: stage 1's negative one) on the first ``val_images`` test pairs of
``data`` (centre crops), outputs clipped and rounded to 8 bits like saved images, PSNR / SSIM
(RGB, :mod:`dmdiff.metrics`) against the path's target, next to the input's own PSNR / SSIM
against it. With EMA, validation and the exported ``RUN/pipeline/`` use the EMA weights.

With ``adversarial`` set, the paths it lists get a generator term from their discriminators and the
discriminators take one step after each micro-batch of their path (:mod:`dmdiff.train.adversarial`);
the discriminators and their optimizer are in every checkpoint, never in ``RUN/pipeline/``.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from dmdiff.config import to_dict
from dmdiff.data.dataset import dataset_psf_grid
from dmdiff.device import eval_mode, torch_threads
from dmdiff.errors import DmdiffError, RunFault
from dmdiff.metrics import psnr, ssim
from dmdiff.model.dmdiff import DMDiff
from dmdiff.model.pipeline import TRAINABLE_FILE, DMDiffPipeline
from dmdiff.optics.sensor import quantize
from dmdiff.outputs import write_json
from dmdiff.runs import PIPELINE, REPORT
from dmdiff.train import checkpoint as ckpt_io
from dmdiff.train.adversarial import Adversary
from dmdiff.train.config import (
    PATH_IO,
    PATHS,
    TrainConfig,
    TrainWarning,
    check_device_support,
)
from dmdiff.train.data import (StepBatches, frame_products, input_too, lens_grids, open_train_sets, path_input,
                               validation_pairs)
from dmdiff.train.ema import EMA
from dmdiff.train.losses import MultipathLoss
from dmdiff.train.processes import use_cpu
from dmdiff.train.rundir import MetricsLog, check_run, write_run_info
from dmdiff.weights import load_safetensors


def load_init_weights(model: DMDiff, source: str) -> None:
    """``init_weights``: a run folder (its ``pipeline/``), a pipeline folder or a safetensors file of
    ``DMDiff.trainable_state_dict()``."""
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


def _quantised(x: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` → ``(B, H, W, 3)`` float64 at 8-bit levels (:func:`dmdiff.optics.sensor.quantize`
    in float32, as saved images hold them)."""
    return quantize(x.float(), 8).permute(0, 2, 3, 1).cpu().double().numpy()


def validation_path(cfg: TrainConfig) -> str:
    """The path validated: positive when it is trained, else the most trained one (stage 1: negative)."""
    probs = cfg.path_probs.normalised()
    return "positive" if probs[0] > 0 else PATHS[int(np.argmax(probs))]


@torch.no_grad()
def validate(model, pairs: list[dict], path: str, accelerator, batch_size: int) -> dict[str, float]:
    """Mean PSNR/SSIM of ``path``'s output against its target (``psnr``, ``ssim``) and of its input
    against the target (``psnr_input``, ``ssim_input``) over ``pairs``, each process taking every
    ``world``-th pair; empty without pairs. Inputs/targets as in training (:mod:`dmdiff.train.data`)."""
    source, reference = PATH_IO[path]
    mine = pairs[accelerator.process_index::accelerator.num_processes]
    rows = []
    with eval_mode(model), torch.random.fork_rng(devices=[]), accelerator.autocast():
        for i in range(0, len(mine), batch_size):
            chunk = mine[i:i + batch_size]
            x = torch.stack([path_input(p, source) for p in chunk]).to(accelerator.device)
            captured = torch.stack([p[source] for p in chunk])
            target = torch.stack([p.get(reference, p["gt"]) for p in chunk])
            maps = torch.stack([p["maps"] for p in chunk]).to(accelerator.device) if "maps" in chunk[0] else None
            anchor = torch.stack([p["anchor"] for p in chunk]).to(accelerator.device) if "anchor" in chunk[0] else None
            out, ref, inp = _quantised(model(x, maps, path, anchor)), _quantised(target), _quantised(captured)
            for o, r, x_ in zip(out, ref, inp):
                rows.append({"psnr": psnr(o, r), "ssim": ssim(o, r), "psnr_input": psnr(x_, r),
                             "ssim_input": ssim(x_, r)})
    rows = gather_object(rows) if accelerator.num_processes > 1 else rows
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The lr of optimizer step ``step`` (0-based): linear warm-up over ``cfg.warmup_steps``, then
    ``cfg.lr`` (``lr_schedule: constant``) or a cosine decay from ``cfg.lr`` to 0 at ``cfg.steps``."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    if cfg.lr_schedule == "cosine" and step >= cfg.warmup_steps:
        lr *= 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)))
    return lr


def anchor_psf(cfg: TrainConfig):
    """The PSF grid ``(3, G, G, K, K)`` a deconvolved colour anchor stores with the model: the lens
    of ``cfg.data`` (its ``lens.json``); None for a lens-family dataset with the Wiener anchor,
    which takes each image's own lens (:func:`dmdiff.train.data.frame_products`, and at inference
    the capture's).

    Raises:
        DmdiffError: ``cfg.data`` has no lens spec (real captures), or is a lens family under the
            Richardson–Lucy anchor, which needs one lens.
    """
    grid, _, reason = dataset_psf_grid(cfg.data)
    if grid is None and cfg.model.anchor_wiener_nsr is not None and lens_grids(cfg.data) is not None:
        return None
    if grid is None:
        key = "anchor_rl_iterations" if cfg.model.anchor_rl_iterations is not None else "anchor_wiener_nsr"
        raise DmdiffError(f"model.{key}: {reason}; set model.{key}: null{input_too(cfg.model)} "
                          "to anchor to the capture itself")
    return grid


#: ``on_log(step, record)``: called with each record written to ``metrics.jsonl``.
LogCallback = Callable[[int, dict], None]


@dataclass
class Session:
    """Everything one training run works with, built by :func:`build_session`.

    ``model`` is the DMDiff model, ``wrapped`` what accelerate made of it (DDP on several
    processes), ``params`` its trained parameters by name; ``adversary`` the discriminators (None
    without an adversarial term); ``log`` is None on all but the main process.
    """

    cfg: TrainConfig
    out: Path
    accelerator: Accelerator
    model: DMDiff
    wrapped: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    loss_fn: MultipathLoss
    ema: EMA | None
    adversary: Adversary | None
    sets: list
    val_pairs: list[dict]
    val_path: str
    on_log: LogCallback | None
    log: MetricsLog | None = None

    @property
    def main(self) -> bool:
        """Whether this is the process that writes files."""
        return self.accelerator.is_main_process

    @property
    def term_names(self) -> tuple[str, ...]:
        """Every loss term a micro-batch may log, in a fixed order (the same on every process)."""
        return ("loss",) + self.loss_fn.term_names + (self.adversary.term_names if self.adversary is not None else ())

    def write_log(self, record: dict) -> None:
        """Append ``record`` to ``metrics.jsonl`` (main process) and hand a copy to ``on_log``."""
        self.log.write(record)
        if self.on_log is not None:
            self.on_log(record["step"], json.loads(json.dumps(record)))


def build_session(cfg: TrainConfig, out: Path, resume: str | None) -> Session:
    """Check ``cfg``, the data and the run folder, then build the accelerator, the model (seeded by
    ``cfg.seed``), the optimizer, the loss, the EMA and the discriminators. Writes nothing.

    Raises:
        DmdiffError: a bad config, dataset or run folder (before anything is built).
    """
    cfg.validate()
    check_device_support(cfg)
    check_run(out, cfg, resume)
    sets = open_train_sets(cfg)               # the data is checked before the lens's PSFs are computed
    psf = anchor_psf(cfg) if cfg.model.anchor_deconvolves else None
    if any(p > 0 for p in cfg.path_probs.normalised()[:2]):      # the positive or neutral path: anchored
        products = [frame_products(cfg.model, ds.root) for ds in sets]
        sets = [ds.with_frame_products(p) if p else ds for ds, p in zip(sets, products)]
        val_products = products[0]
    else:
        val_products = {}
    val_pairs = validation_pairs(cfg, sets[0].map_paths is not None, val_products)
    AcceleratorState._reset_state()   # keeps the processes; lets this run set its own mixed precision
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=use_cpu())
    set_seed(cfg.seed)
    model = DMDiff(cfg.model)
    if psf is not None:
        model.set_anchor_psf(psf)
    if cfg.init_weights:
        load_init_weights(model, cfg.init_weights)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=cfg.adam_betas,
                                  weight_decay=cfg.weight_decay)
    loss_fn = MultipathLoss(cfg.loss, accelerator.device, by_path=cfg.path_losses())
    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay else None
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    adversary = None
    if cfg.adversarial_paths():
        adversary = Adversary(cfg.adversarial, cfg.adversarial_paths(), cfg.seed, accelerator)
    return Session(cfg, out, accelerator, model, wrapped, params, optimizer, loss_fn, ema, adversary, sets,
                   val_pairs, validation_path(cfg), None)


def load_checkpoint_into(session: Session, state: ckpt_io.Checkpoint) -> int:
    """Load a checkpoint into the training state (weights, optimizer, EMA, discriminators, grad
    scaler, generators); returns its step.

    Raises:
        DmdiffError: the checkpoint does not fit (its discriminator included, or it has none and the
            config trains one), or was trained on another base backbone (e.g. the shipped tiny
            backbone appeared or changed since).
    """
    model, accelerator = session.model, session.accelerator
    saved = state.state["extra"].get("backbone")
    if saved is not None and saved != model.backbone.source:
        raise DmdiffError(f"{state.path} was trained on the backbone {saved!r}, but this model loads "
                          f"{model.backbone.source!r}; resuming would mix them (start a new run)")
    if state.state["world_size"] != accelerator.num_processes:
        warnings.warn(f"{state.path} was written by {state.state['world_size']} process(es), this run has "
                      f"{accelerator.num_processes}: the data order from here on differs from the original "
                      "run's", TrainWarning, stacklevel=3)
    _load_params(session.params, state.model, state.path)
    session.optimizer.load_state_dict(state.optimizer)
    if session.ema is not None:
        if state.ema is None:
            raise DmdiffError(f"{state.path} has no EMA weights but ema_decay is set")
        session.ema.load(state.ema)
    if session.adversary is not None:
        if state.discriminator is None:
            raise DmdiffError(f"{state.path} has no discriminator ({ckpt_io.DISCRIMINATOR}), but the config trains "
                              f"one (adversarial.weight = {session.cfg.adversarial.weight} on paths "
                              f"{', '.join(session.adversary.paths)}); resume it with the adversarial settings it "
                              "was written with, or start a new run (init_weights takes its trained weights)")
        session.adversary.load_state_dict({"weights": state.discriminator, "optimizer": state.discriminator_optimizer},
                                          where=str(state.path))
    elif state.discriminator is not None:
        warnings.warn(f"{state.path} holds a discriminator, but this config trains none (adversarial); it is "
                      "not used", TrainWarning, stacklevel=3)
    if accelerator.scaler is not None and state.state["extra"].get("scaler"):
        accelerator.scaler.load_state_dict(state.state["extra"]["scaler"])
    if state.rng is not None:
        ckpt_io.restore_rng(state.rng)
    return state.step


class LossStats:
    """The training losses of one logging interval: the mean of each of ``names`` (the loss and its
    terms) over the micro-batches that computed it, the images of each path, and each path's mean
    loss over the micro-batches that trained it alone (``path_loss``)."""

    def __init__(self, device: torch.device, names: tuple[str, ...]):
        self.names = names
        self.sums, self.n = torch.zeros(len(names), device=device), torch.zeros(len(names), device=device)
        self.counts = np.zeros(len(PATHS), dtype=np.int64)
        self.steps = 0
        self.path_sum, self.path_n = torch.zeros(len(PATHS), device=device), torch.zeros(len(PATHS), device=device)

    def add(self, loss: torch.Tensor, terms: dict, path_ids: list[int]) -> None:
        """Count one micro-batch: its loss, the terms it computed, its paths."""
        for k, v in {"loss": loss.detach(), **terms}.items():
            i = self.names.index(k)
            self.sums[i] += v.float()
            self.n[i] += 1
        self.counts += np.bincount(path_ids, minlength=len(PATHS))
        if len(set(path_ids)) == 1:
            self.path_sum[path_ids[0]] += loss.detach().float()
            self.path_n[path_ids[0]] += 1

    def record(self, accelerator: Accelerator) -> dict:
        """The interval's means and counts, reduced over processes (``loss``, the terms computed,
        ``path_loss``, ``paths``: images per path)."""
        sums, ns = (accelerator.reduce(t, "sum").tolist() for t in (self.sums, self.n))
        record = {k: s / n for k, s, n in zip(self.names, sums, ns) if n}
        sums, ns = (accelerator.reduce(t, "sum").tolist() for t in (self.path_sum, self.path_n))
        record["path_loss"] = {p: s / n for p, s, n in zip(PATHS, sums, ns) if n}
        counts = accelerator.reduce(torch.from_numpy(self.counts).to(self.sums.device), "sum").tolist()
        record["paths"] = dict(zip(PATHS, counts))
        return record


def train_step(session: Session, batches, lr: float, step: int, stats: LossStats) -> None:
    """One optimizer step (``step``, 0-based) at learning rate ``lr``: ``grad_accum`` micro-batches
    from ``batches``, each with its path's losses (and, from ``adversarial.start_step`` on, the
    adversarial term), backward, then a discriminator step on it; clipping, the update, the EMA.
    Counts the losses into ``stats``.

    Raises:
        RunFault: a NaN or infinite loss (:func:`non_finite_loss`), the discriminator's included.
    """
    cfg, accelerator, adversary = session.cfg, session.accelerator, session.adversary
    for group in session.optimizer.param_groups:
        group["lr"] = lr
    for _ in range(cfg.grad_accum):
        batch = {k: v.to(accelerator.device) for k, v in next(batches).items()}
        path_ids = batch["path"].tolist()
        paths = [PATHS[i] for i in path_ids]
        with accelerator.accumulate(session.wrapped):
            output = session.wrapped(batch["input"], batch.get("maps"), paths, batch.get("anchor"))
            loss, terms = session.loss_fn(output, batch["target"], paths)
            if adversary is not None and adversary.generator_active(step):
                term, adv_terms = adversary.generator_loss(output, paths)
                if term is not None:
                    loss, terms = loss + term, {**terms, **adv_terms}
            if not torch.isfinite(loss):
                raise non_finite_loss(step + 1, loss, terms, paths, session.out)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.grad_clip is not None:
                accelerator.clip_grad_norm_(list(session.params.values()), cfg.grad_clip)
            session.optimizer.step()
            session.optimizer.zero_grad(set_to_none=True)
        if adversary is not None:
            terms.update(adversary.discriminator_step(batch["target"], output.detach(), paths, step + 1))
        stats.add(loss, terms, path_ids)
    if session.ema is not None:
        session.ema.update(session.params)
    stats.steps += 1


def run_validation(session: Session, step: int) -> dict:
    """Validate (:func:`validate`, with the EMA weights when there is an EMA) and log the result."""
    with session.ema.applied(session.params) if session.ema else contextlib.nullcontext():
        metrics = validate(session.accelerator.unwrap_model(session.wrapped), session.val_pairs, session.val_path,
                           session.accelerator, session.cfg.batch_size)
    if session.main and metrics:
        session.write_log({"step": step, "kind": "val", "path": session.val_path, **metrics})
    return metrics


def save_checkpoint(session: Session, step: int) -> None:
    """Write ``RUN/checkpoint-<step>`` (every process its generators, the main one the rest) and prune.

    Raises:
        RunFault: the disk is full or the folder cannot be written: the unfinished checkpoint is
            removed, the earlier ones stay.
    """
    cfg, out, accelerator = session.cfg, session.out, session.accelerator
    folder, world = ckpt_io.partial_dir(out, step), accelerator.num_processes
    try:
        if session.main:
            folder.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        ckpt_io.write_rng(folder, accelerator.process_index)
        accelerator.wait_for_everyone()
        if session.main:
            scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            adversary = session.adversary.state_dict() if session.adversary is not None else None
            ckpt_io.write_checkpoint(folder, step, model=session.params, optimizer=session.optimizer.state_dict(),
                                     ema=session.ema.shadow if session.ema else None,
                                     discriminator=adversary["weights"] if adversary else None,
                                     discriminator_optimizer=adversary["optimizer"] if adversary else None,
                                     samples_seen=step * cfg.grad_accum * cfg.batch_size * world, world_size=world,
                                     extra={"scaler": scaler, "backbone": session.model.backbone.source})
    except OSError as e:
        shutil.rmtree(folder, ignore_errors=True)
        kept = [p.name for _, p in ckpt_io.list_checkpoints(out)]
        raise RunFault(f"could not write the checkpoint of step {step} into {out} ({e.strerror or e}"
                       f"{': ' + str(e.filename) if e.filename else ''}); the unfinished checkpoint was "
                       f"removed and the run keeps {', '.join(kept) or 'no checkpoint yet'}. Free some "
                       "space and rerun with --resume latest") from None
    if session.main:
        ckpt_io.prune(out, cfg.keep_last)
    accelerator.wait_for_everyone()


def export(session: Session, report: dict) -> None:
    """Write ``RUN/pipeline/`` (EMA weights with EMA) and then ``train_report.json``, atomically."""
    with session.ema.applied(session.params) if session.ema else contextlib.nullcontext():
        DMDiffPipeline.from_model(session.model).save_pretrained(session.out / PIPELINE, overwrite=True)
    write_json(session.out / REPORT, report)


def train(cfg: TrainConfig, out: str | Path, resume: str | None = None, *, progress: bool = True,
          stop_at_step: int | None = None, command: str = "dmdiff train", on_log: LogCallback | None = None) -> dict:
    """Train DMDiff with ``cfg`` into the run folder ``out`` (with ``cfg.threads`` torch threads,
    restored afterwards).

    Args:
        cfg: the settings (validated again here).
        out: the run folder (created; see :mod:`dmdiff.runs`).
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
        RunFault: a non-finite loss, or a checkpoint that cannot be written.
    """
    out = Path(out)
    with torch_threads(cfg.threads):
        # 1. Build: check the config, data and folder, then the accelerator, model, optimizer, EMA.
        session = build_session(cfg, out, resume)
        session.on_log = on_log
        accelerator = session.accelerator

        # 2. Resume: claim the folder, write the config and provenance, then load the newest good checkpoint.
        if session.main:
            write_run_info(out, cfg, resume, command)
            ckpt_io.clean_partial(out)
        accelerator.wait_for_everyone()
        state = ckpt_io.find_checkpoint(out, resume, accelerator.process_index) if resume else None
        start = load_checkpoint_into(session, state) if state is not None else 0
        session.log = MetricsLog(out, start) if session.main else None

        # 3. The data: micro-batch i is a pure function of (seed, i), so resuming just starts later.
        n_micro = cfg.steps * cfg.grad_accum
        batches = StepBatches(session.sets, cfg, n_micro, accelerator.process_index, accelerator.num_processes)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start * cfg.grad_accum, n_micro),
                                             num_workers=cfg.num_workers, pin_memory=accelerator.device.type == "cuda")
        batch_iter = iter(loader)

        # 4. The loop: a step, then logging, validation and checkpoints on their schedules.
        step_times, last_val, last_train, stats = [], {}, {}, LossStats(accelerator.device, session.term_names)
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {out.name}", unit="step",
                   disable=not (progress and session.main), file=sys.stderr)
        t_start = t_interval = time.perf_counter()
        for step in range(start, cfg.steps):
            lr = learning_rate(cfg, step)
            train_step(session, batch_iter, lr, step, stats)
            done = step + 1
            bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.steps:
                record = last_train = stats.record(accelerator)
                step_times.append((time.perf_counter() - t_interval) / stats.steps)   # .item() synchronised
                t_interval = time.perf_counter()
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if session.main:
                    session.write_log({"step": done, "kind": "train", **record, "lr": lr,
                                       "step_time_s": step_times[-1]})
                stats = LossStats(accelerator.device, session.term_names)
            t_pause = time.perf_counter()                 # validation and checkpoints are not step time
            if cfg.val_images and ((cfg.validate_every and done % cfg.validate_every == 0) or done == cfg.steps):
                last_val = run_validation(session, done)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                save_checkpoint(session, done)
            if stop_at_step is not None and stop_at_step <= done < cfg.steps:
                bar.close()
                return {"completed": False, "steps": done}
            t_interval += time.perf_counter() - t_pause
        bar.close()

        # 5. The end: validate a run that was already finished, then export the model and the report.
        if start >= cfg.steps and cfg.val_images:
            last_val = run_validation(session, cfg.steps)
        report = {"completed": True, "steps": cfg.steps, "resumed_from_step": start,
                  "wall_s": round(time.perf_counter() - t_start, 2),
                  "step_time_s": {"median": median(step_times), "mean": float(np.mean(step_times))} if step_times else None,
                  "val": {"path": session.val_path, **last_val} if last_val else {},
                  "perceptual_term": session.loss_fn.perceptual, "loss_note": session.loss_fn.note,
                  "adversarial": adversarial_report(session, last_train),
                  "processes": accelerator.num_processes, "device": str(accelerator.device)}
        if session.main:
            export(session, report)
        accelerator.wait_for_everyone()
        return report


def adversarial_report(session: Session, last: dict) -> dict | None:
    """``train_report.json``'s ``adversarial`` record: the settings, the paths that had a
    discriminator and the adversarial terms of the last training log line (``final``; empty when
    this process trained no step, e.g. a finished run resumed); None without an adversarial term."""
    if session.adversary is None:
        return None
    return {**to_dict(session.cfg.adversarial), "paths_trained": list(session.adversary.paths),
            "final": {k: last[k] for k in session.adversary.term_names if k in last}}


def non_finite_loss(step: int, loss: torch.Tensor, terms: dict, paths: list[str], out: Path) -> RunFault:
    """The error for a NaN/Inf training loss at optimizer step ``step`` (1-based): what was computed
    and what to check. The checkpoints written so far are untouched."""
    detail = ", ".join(f"{k} {float(torch.as_tensor(v).detach()):.4g}" for k, v in terms.items())
    return RunFault(f"step {step}: the training loss is {loss.detach().item()} ({detail}; paths {', '.join(sorted(set(paths)))}). "
                    "Check the learning rate (lr, warmup_steps), the loss weights and the data (NaN or "
                    f"infinite pixels or maps); {out}'s earlier checkpoints are kept: fix the cause and "
                    "rerun, with --resume latest to continue from the last one")
