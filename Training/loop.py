"""Shared training loop: DDP, bf16 autocast, EMA, clipping, atomic resumable checkpoints, logs.

Used by ``train_vae.py`` and ``train_diffusion.py``. A *task* supplies the model, the dataset,
the loss of one batch, the per-epoch validation and the export to the model checkpoint format;
``fit`` does the rest the same way for both:

- one process per GPU under ``torchrun`` (DDP; NCCL on CUDA, gloo on CPU); the same script runs
  alone on one CPU or GPU. Logs, validation and checkpoints on rank 0 only;
- ``train_state.pt`` every ``checkpoint_every`` steps, written atomically, holding the step,
  model, optimizer, LR schedule, EMA, every rank's RNG states; the data position is the step
  (samples are a pure function of (seed, epoch, index), see ``crop_data.py``), so ``--resume``
  continues exactly where the run stopped;
- a loss or gradient that is NaN/inf stops the run with a clear message; the last checkpoint,
  written before it, is kept.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from torch.utils.data import DistributedSampler

from ctsliceinterp.core.errors import CTSliceInterpError
from ctsliceinterp.io.atomic import atomic_file

STATE_FILE = "train_state.pt"
MODEL_DIR = "model"
LOG_FILE = "log.jsonl"
EXIT_NON_FINITE = 3


class TrainingError(CTSliceInterpError):
    """A training run cannot start or continue (bad config, missing data, diverged loss...)."""


class NonFiniteLoss(TrainingError):
    pass


# --- config ----------------------------------------------------------------------------------
def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> dict[str, Any]:
    """A YAML config with ``section.key=value`` overrides (values parsed as YAML)."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TrainingError(f"cannot read the config {path}: {exc}") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise TrainingError(f"--set expects section.key=value, got {item!r}")
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return config


def add_common_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (Training/configs/*.yaml)")
    parser.add_argument("--out", required=True, help="run folder: train_state.pt, model/, log.jsonl, tensorboard/, samples/")
    parser.add_argument("--cache", help="training cache from `ctsliceinterp preprocess` (overrides data.cache)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args) -> dict[str, Any]:
    config = load_config(args.config, args.set)
    config.setdefault("data", {})
    config.setdefault("train", {})
    if args.cache:
        config["data"]["cache"] = args.cache
    if args.max_steps is not None:
        config["train"]["max_steps"] = args.max_steps
    return config


TRAIN_DEFAULTS = {
    "seed": 0, "batch_size": 8, "lr": 2e-4, "weight_decay": 0.0, "betas": [0.9, 0.999], "warmup_steps": 100,
    "max_steps": 1000, "steps_per_epoch": 200, "ema_decay": 0.999, "grad_clip": 1.0, "grad_checkpointing": False,
    "bf16": True, "checkpoint_every": 200, "log_every": 10, "val_items": 16, "num_workers": 2,
    "decay_start": None, "decay_steps": 1000, "final_lr_ratio": 0.05,
}


def train_settings(config: dict[str, Any]) -> dict[str, Any]:
    unknown = set(config.get("train", {})) - set(TRAIN_DEFAULTS)
    if unknown:
        raise TrainingError(f"unknown train settings: {', '.join(sorted(unknown))}")
    return {**TRAIN_DEFAULTS, **config.get("train", {})}


# --- distributed -----------------------------------------------------------------------------
class Runtime:
    """Rank, world size and device; set up from torchrun's environment (or a single process)."""

    def __init__(self, device: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        if use_cuda and not torch.cuda.is_available():
            raise TrainingError("--device cuda was asked for but no CUDA GPU is available")
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any_true(self, flag: bool) -> bool:
        if not self.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value)
        return bool(value.item() > 0)

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item() / self.world)

    def gather(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA; full precision on the CPU (bf16 there is slow and not needed)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- EMA -------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of a module's parameters (buffers copied)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # Warm-up (as in diffusers' EMAModel): early averages do not remember the random init.
        decay = min(self.decay, (1 + step) / (10 + step))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.model.load_state_dict(state["model"])


# --- logs ------------------------------------------------------------------------------------
class RunLogger:
    """JSONL + TensorBoard on rank 0 (other ranks log nothing)."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled:
            self.path = out / LOG_FILE
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # TensorBoard is optional: the JSONL log is always written
                self.writer = None

    def log(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch part-way (``start``: samples per rank to skip),
    so a resumed run continues at its exact data position."""

    start = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


# --- checkpoints -----------------------------------------------------------------------------
def save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def lr_lambda(warmup: int, decay_start: Optional[int] = None, decay_steps: int = 1000, final_ratio: float = 0.05):
    """Linear warm-up, then constant; from ``decay_start`` (if set) a cosine down to ``final_ratio``
    over ``decay_steps``. Not tied to max_steps, so a run can be extended, then annealed: the
    schedule is rebuilt from the config on ``--resume`` (LambdaLR saves no lambdas)."""

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / max(1, warmup))
        if decay_start is None or step < decay_start:
            return ramp
        progress = min(1.0, (step - decay_start) / max(1, decay_steps))
        return ramp * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    return factor


def _check_run_folder(out: Path, state_path: Path, resume: bool, runtime: Runtime) -> None:
    if runtime.main:
        out.mkdir(parents=True, exist_ok=True)
        if state_path.exists() and not resume:
            raise TrainingError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    if resume and not state_path.exists():
        raise TrainingError(f"--resume: {state_path} does not exist")
    runtime.barrier()


class _Optimisation:
    """Model, optimizer, LR schedule and EMA of one run, saved to and restored from ``train_state.pt``."""

    def __init__(self, task, settings: dict[str, Any], runtime: Runtime):
        self.lr = float(settings["lr"])  # restore() applies it over the saved state's
        self.model = task.model.to(runtime.device)
        if settings["grad_checkpointing"]:
            task.enable_gradient_checkpointing()
        self.ema = EMA(self.model, settings["ema_decay"])
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=float(settings["lr"]), betas=tuple(settings["betas"]),
                                           weight_decay=float(settings["weight_decay"]))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(
            int(settings["warmup_steps"]), settings["decay_start"], int(settings["decay_steps"]), float(settings["final_lr_ratio"])))

    def restore(self, state_path: Path, runtime: Runtime, seed: int) -> int:
        """Load the saved state; returns its step."""
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The saved state holds the LR it started with; the config's wins, so a run can be extended at another LR.
        self.scheduler.base_lrs = [self.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.lr
            group["lr"] = self.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        self.ema.load_state_dict(state["ema"])
        step = int(state["step"])
        rngs = state["rng"]
        if len(rngs) == runtime.world:
            set_rng_state(rngs[runtime.rank])
        else:  # another world size: continue, but the random streams cannot be the same
            seed_everything(seed + runtime.rank + 7919 * step)
            if runtime.main:
                print(f"note: resumed with {runtime.world} processes instead of {len(rngs)}: random streams re-seeded", file=sys.stderr)
        return step

    def save(self, state_path: Path, step: int, config: dict[str, Any], runtime: Runtime) -> None:
        rngs = runtime.gather(rng_state())  # every rank takes part in the gather
        if runtime.main:
            save_state(state_path, {"step": step, "model": self.model.state_dict(),
                                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                                    "ema": self.ema.state_dict(), "rng": rngs, "config": config,
                                    "world_size": runtime.world})

    def step(self, task, train_model, batch_data, settings: dict[str, Any], runtime: Runtime, step: int,
             last_checkpoint: Optional[Path]) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """One optimizer step; ``NonFiniteLoss`` when the loss or its gradient is NaN/inf."""
        with autocast(runtime.device, settings["bf16"]):
            loss, values = task.loss(train_model, batch_data, runtime.device)
        self.optimizer.zero_grad(set_to_none=True)
        # Agreed across ranks before backward (a rank skipping it would hang DDP's all-reduce).
        finite = not runtime.any_true(not bool(torch.isfinite(loss.detach()).all()))
        grad_norm = None
        if finite:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, float(settings["grad_clip"]))
            finite = bool(torch.isfinite(grad_norm))  # gradients are all-reduced: same on every rank
        if not finite:
            raise NonFiniteLoss(
                f"the loss or its gradient became NaN/inf at step {step + 1}: training stopped. The last good "
                f"checkpoint is {last_checkpoint or '(none yet)'}; lower train.lr, keep train.grad_clip, check the data, "
                "and continue with --resume"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model, step)
        return loss, values, grad_norm


def fit(task, config: dict[str, Any], out: Path, runtime: Runtime, resume: bool = False, progress: bool = True) -> int:
    """Train ``task`` to ``train.max_steps``. Returns the process exit code."""
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    settings = train_settings(config)
    out = Path(out)
    state_path = out / STATE_FILE
    _check_run_folder(out, state_path, resume, runtime)

    seed = int(settings["seed"])
    seed_everything(seed + runtime.rank)
    run = _Optimisation(task, settings, runtime)
    step = run.restore(state_path, runtime, seed) if resume else 0
    train_model = DistributedDataParallel(run.model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None) \
        if runtime.distributed else run.model

    batch = int(settings["batch_size"])
    per_epoch = int(settings["steps_per_epoch"])
    max_steps = int(settings["max_steps"])
    dataset = task.train_dataset
    dataset.length = per_epoch * batch * runtime.world
    sampler = ResumableDistributedSampler(dataset, num_replicas=runtime.world, rank=runtime.rank, shuffle=False)
    logger = RunLogger(out, runtime.main)
    if runtime.main:
        logger.log(step, {"config": config, "world_size": runtime.world, "device": str(runtime.device),
                          "resumed": resume}, kind="start")
    bar = tqdm(total=max_steps, initial=step, desc=task.name, unit="step", disable=not (progress and runtime.main),
               dynamic_ncols=True)
    last_checkpoint = state_path if state_path.exists() else None
    started, first_step = time.perf_counter(), step
    try:
        while step < max_steps:
            epoch, offset = divmod(step, per_epoch)
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            sampler.start = offset * batch
            loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=int(settings["num_workers"]),
                                drop_last=True, collate_fn=getattr(dataset, "collate", None), generator=torch.Generator(),
                                pin_memory=runtime.device.type == "cuda", persistent_workers=False)
            train_model.train()
            for batch_data in loader:
                loss, values, grad_norm = run.step(task, train_model, batch_data, settings, runtime, step, last_checkpoint)
                step += 1
                bar.update(1)
                if step % int(settings["log_every"]) == 0 or step == max_steps:
                    values = {"loss": runtime.mean(float(loss.detach())), "grad_norm": float(grad_norm),
                              "lr": run.scheduler.get_last_lr()[0], "epoch": epoch,
                              "steps_per_s": (step - first_step) / max(1e-9, time.perf_counter() - started),
                              **{k: runtime.mean(float(v)) for k, v in values.items()}}
                    logger.log(step, values)
                    bar.set_postfix(loss=f"{values['loss']:.4f}")
                if step % int(settings["checkpoint_every"]) == 0 or step == max_steps:
                    run.save(state_path, step, config, runtime)
                    last_checkpoint = state_path
                if step % per_epoch == 0 or step == max_steps:
                    if runtime.main:
                        _validate_and_export(task, run.ema.model, epoch, step, out, runtime, logger, bar)
                    runtime.barrier()
                if step >= max_steps:
                    break
    except NonFiniteLoss as exc:
        if runtime.main:
            print(f"error: {exc}", file=sys.stderr)
            logger.log(step, {"error": str(exc)}, kind="stop")
        return EXIT_NON_FINITE
    finally:
        bar.close()
        logger.close()
    return 0


def _validate_and_export(task, model, epoch: int, step: int, out: Path, runtime: Runtime, logger: RunLogger, bar) -> None:
    metrics = task.validate(model, epoch, out, runtime.device)
    logger.log(step, metrics, kind="val")
    task.export(model, out / MODEL_DIR, {"step": step, "epoch": epoch, **metrics})
    bar.write(f"epoch {epoch} step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))


def run_main(build_task, argv=None, description: str = "") -> int:
    """Shared ``main`` of the training scripts: parse, set up the runtime, fit, clean up."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    runtime = None
    try:
        config = config_from_args(args)
        runtime = Runtime(args.device)
        seed_everything(int(train_settings(config)["seed"]))  # the same initial weights on every run and rank
        task = build_task(config, runtime, Path(args.out))
        return fit(task, config, Path(args.out), runtime, resume=args.resume, progress=not args.no_progress)
    except CTSliceInterpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if runtime is not None:
            runtime.close()
