"""The training engine shared by every trainable detector (plain torch, no Lightning).

A training run is a list of `Phase`s (one for most models; f-AnoGAN has a GAN phase then an
encoder phase). Each phase has a step function that does its own forward/backward/optimizer
updates on one batch and returns its losses; the `Trainer` handles everything around it:

- epochs over in-memory training tensors, shuffled per epoch by a seeded generator;
- a progress bar (loss, steps/s, ETA over the whole phase) on stderr;
- a validation loss on held-out goods after every epoch and early stopping (`patience`), the
  best weights being restored at the end of the phase;
- a checkpoint after every epoch (one safetensors file: module weights, flattened optimizer
  state, best weights; JSON header for epoch, history and optimizer hyper-parameters; no pickle)
  and `resume=True` to continue from it after a crash or Ctrl-C (at most one epoch is lost;
  a run that had finished - completed, early-stopped or out of time - just reloads its weights);
- reproducibility: the global torch RNG and the shuffle generator are re-seeded from
  (seed, phase, epoch) at the start of every epoch, so a resumed run is bit-identical to an
  uninterrupted one on the same device without saving any RNG state;
- `device` and mixed precision (bfloat16 autocast on CUDA; off on CPU);
- a wall-clock budget `max_minutes` (the running epoch is cut short when it is spent).

Usage (a model with one optimizer)::

    from anomalens.models.training import Phase, StepContext, Trainer, TrainConfig

    net = MyNet().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step(x: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        with ctx.autocast():
            loss = F.mse_loss(net(x), x)
        ctx.update(loss, opt)            # zero_grad + backward + step
        return {"loss": loss}

    def val_loss(x: torch.Tensor) -> torch.Tensor:  # mean loss of a batch, under no_grad
        return F.mse_loss(net(x), x)

    trainer = Trainer({"net": net}, TrainConfig(batch_size=16, seed=0, device=device,
                      checkpoint="ckpt/ae.safetensors", resume=True, max_minutes=10, progress=True))
    result = trainer.fit([Phase("train", step, epochs=50, optimizers={"adam": opt},
                                val_loss=val_loss, patience=5)], train_pixels, val_pixels)
    result.history  # one dict per epoch: phase, epoch, loss (and other step losses), val_loss, seconds

GANs pass several optimizers in one phase's `optimizers` and call `ctx.update` once per
optimizer inside their step (`ctx.step` counts steps within the phase, e.g. for n_critic);
multi-phase training passes several `Phase`s (`train_modules`
names the modules put in train mode; the others stay in eval mode and should be frozen by the
step function, e.g. by only stepping the optimizer of the trained module).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from anomalens.data.progress import progress_bar

CHECKPOINT_FORMAT = 1
AUGMENTATIONS = ("flip", "rotate", "noise")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (unreadable, or from another configuration)."""


class StepContext:
    """What a step function gets besides its batch: autocast and optimizer updates."""

    def __init__(self, device: torch.device, amp_dtype: torch.dtype | None) -> None:
        self.device = device
        self.amp_dtype = amp_dtype
        self.epoch = 0  # epoch of the current phase, from 0
        self.step = 0  # step of the current phase, from 0, counted across epochs (and resumes)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the forward pass where it is enabled (CUDA), a no-op elsewhere."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @staticmethod
    def update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, *, retain_graph: bool = False) -> None:
        """zero_grad, backward, step. bfloat16 autocast needs no gradient scaler."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward(retain_graph=retain_graph)
        optimizer.step()


StepFn = Callable[[torch.Tensor, StepContext], dict[str, torch.Tensor | float]]


@dataclass
class Phase:
    """One stage of training.

    `step(batch, ctx)` trains on one batch and returns named losses ("loss" is shown in the
    progress bar; all are averaged per epoch into the history). `val_loss(batch)` returns the
    mean validation loss of a batch (run under no_grad, modules in eval mode); with it, the best
    weights are kept and restored, and `patience` > 0 stops after that many epochs without
    improvement. `time_share` is the fraction of the trainer's `max_minutes` this phase may use.
    """

    name: str
    step: StepFn
    epochs: int
    optimizers: dict[str, torch.optim.Optimizer]
    val_loss: Callable[[torch.Tensor], torch.Tensor] | None = None
    patience: int = 0
    train_modules: tuple[str, ...] | None = None  # None: every module trains
    time_share: float = 1.0
    # called under no_grad with the training images when the phase starts afresh (also when a
    # resume lands on its first epoch), e.g. to measure frozen modules; what it sets must live in
    # the modules' state (a buffer) so that a resume further into the phase finds it
    on_start: Callable[[torch.Tensor], None] | None = None


@dataclass
class TrainConfig:
    batch_size: int = 16
    seed: int = 0
    device: torch.device | str = "cpu"
    amp: bool = True  # bfloat16 autocast on CUDA (ignored on CPU)
    checkpoint: str | Path | None = None  # file written after every epoch
    resume: bool = False
    max_minutes: float = 0.0  # 0: no wall-clock budget
    progress: bool = False
    desc: str = "train"
    augment: tuple[str, ...] = ()  # any of AUGMENTATIONS, applied to training batches only


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    # "completed", or "; "-joined notes: "early stopping (<phase>)", "time budget (<phase>)"
    stopped: str = "completed"
    seconds: float = 0.0  # wall-clock training time, including runs before a resume
    resumed_from: str | None = None  # "<phase>:<epoch>" when resumed

    def summary(self) -> dict[str, Any]:
        """JSON-safe digest for a detector's fit_info."""
        last = self.history[-1] if self.history else {}
        return {
            "epochs_run": len(self.history),
            "stopped": self.stopped,
            "train_seconds": round(self.seconds, 2),
            "final_loss": last.get("loss"),
            "final_val_loss": last.get("val_loss"),
            "resumed_from": self.resumed_from,
        }


def augment_batch(
    x: torch.Tensor, kinds: tuple[str, ...], *, max_degrees: float = 10.0, noise_std: float = 0.02
) -> torch.Tensor:
    """Random horizontal/vertical flips, small rotations and Gaussian noise on a (B, C, H, W) batch.

    Draws from the global torch RNG, which the trainer re-seeds every epoch (reproducible).
    Rotation pads by reflection so no black corners look like defects.
    """
    unknown = sorted(set(kinds) - set(AUGMENTATIONS))
    if unknown:
        raise ValueError(
            f"augment: unknown kind(s) {', '.join(unknown)}; use any of {', '.join(AUGMENTATIONS)}"
        )
    b = x.shape[0]
    if "flip" in kinds:
        h = torch.rand(b, device=x.device) < 0.5
        v = torch.rand(b, device=x.device) < 0.5
        x = torch.where(h.view(-1, 1, 1, 1), x.flip(-1), x)
        x = torch.where(v.view(-1, 1, 1, 1), x.flip(-2), x)
    if "rotate" in kinds:
        angle = (torch.rand(b, device=x.device) * 2 - 1) * math.radians(max_degrees)
        cos, sin = angle.cos(), angle.sin()
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if "noise" in kinds:
        x = x + noise_std * torch.randn_like(x)
    return x


def parse_augment(spec: str) -> tuple[str, ...]:
    """'flip,rotate' -> ('flip', 'rotate'), validated; '' -> ()."""
    kinds = tuple(k.strip() for k in spec.split(",") if k.strip())
    augment_batch(torch.zeros(1, 1, 2, 2), kinds)  # validates names
    return kinds


def _epoch_seed(seed: int, phase: int, epoch: int) -> int:
    return (seed * 1_000_003 + phase * 10_007 + epoch) % (2**63)


class Trainer:
    """Runs phases over in-memory tensors with checkpoints, resume, early stopping and a time budget."""

    def __init__(self, modules: dict[str, nn.Module], config: TrainConfig) -> None:
        self.modules = modules
        self.config = config
        self.device = torch.device(config.device)
        amp = config.amp and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.ctx = StepContext(self.device, torch.bfloat16 if amp else None)

    # -- checkpoint ------------------------------------------------------------------------------
    def _signature(self, phases: list[Phase], n_train: int) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed: the architecture, phases, seed, data size."""
        return {
            "modules": {
                name: {k: list(v.shape) for k, v in m.state_dict().items()}
                for name, m in self.modules.items()
            },
            "phases": [[p.name, p.epochs] for p in phases],
            "seed": self.config.seed,
            "batch_size": self.config.batch_size,
            "n_train": n_train,
            "augment": list(self.config.augment),
        }

    def _save(
        self, path: Path, phases: list[Phase], meta: dict[str, Any], best: dict[str, torch.Tensor] | None
    ) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for name, module in self.modules.items():
            for k, v in module.state_dict().items():
                tensors[f"module/{name}/{k}"] = v.detach().cpu().clone().contiguous()
        for k, v in (best or {}).items():
            tensors[f"best/{k}"] = v.detach().cpu().clone().contiguous()
        opt_meta = {}
        for phase in phases:
            for name, opt in phase.optimizers.items():
                sd = opt.state_dict()
                scalars: dict[str, dict[str, Any]] = {}
                for pid, state in sd["state"].items():
                    for k, v in state.items():
                        if torch.is_tensor(v):
                            tensors[f"optim/{phase.name}/{name}/{pid}/{k}"] = (
                                v.detach().cpu().clone().contiguous()
                            )
                        else:
                            scalars.setdefault(str(pid), {})[k] = v
                opt_meta[f"{phase.name}/{name}"] = {"param_groups": sd["param_groups"], "scalars": scalars}
        header = {"format": CHECKPOINT_FORMAT, **meta, "optimizers": opt_meta}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"anomalens_checkpoint": json.dumps(header)})
        tmp.replace(path)  # a crash while writing keeps the previous epoch's checkpoint intact

    def _load(
        self, path: Path, phases: list[Phase], signature: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})["anomalens_checkpoint"])
            tensors = load_file(str(path))
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as err:
            raise CheckpointError(
                f"checkpoint '{path}' is unreadable ({type(err).__name__}); delete it to start over"
            ) from None
        if header.get("format") != CHECKPOINT_FORMAT or header.get("signature") != json.loads(
            json.dumps(signature)
        ):
            raise CheckpointError(
                f"checkpoint '{path}' was written with another model configuration or data; "
                "delete it or train without resume"
            )
        for name, module in self.modules.items():
            prefix = f"module/{name}/"
            module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        for phase in phases:
            for name, opt in phase.optimizers.items():
                meta = header["optimizers"][f"{phase.name}/{name}"]
                prefix = f"optim/{phase.name}/{name}/"
                state: dict[int, dict[str, Any]] = {}
                for k, v in tensors.items():
                    if k.startswith(prefix):
                        pid, key = k[len(prefix) :].split("/", 1)
                        state.setdefault(int(pid), {})[key] = v
                for pid, scalars in meta["scalars"].items():
                    state.setdefault(int(pid), {}).update(scalars)
                opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        best = {k[len("best/") :]: v for k, v in tensors.items() if k.startswith("best/")}
        return header, best or None

    # -- training --------------------------------------------------------------------------------
    def _batches(self, data: torch.Tensor, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
        order = (
            torch.randperm(len(data), generator=generator)
            if generator is not None
            else torch.arange(len(data))
        )
        bs = self.config.batch_size
        for i in range(0, len(data), bs):
            yield data[order[i : i + bs]].to(self.device, non_blocking=True)

    @torch.no_grad()
    def _validate(self, phase: Phase, val: torch.Tensor) -> float:
        for m in self.modules.values():
            m.eval()
        total = 0.0
        for x in self._batches(val, None):
            with self.ctx.autocast():
                total += float(phase.val_loss(x)) * len(x)
        return total / len(val)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}/{k}": v.detach().clone()
            for name, m in self.modules.items()
            for k, v in m.state_dict().items()
        }

    def _restore_snapshot(self, snap: dict[str, torch.Tensor]) -> None:
        for name, m in self.modules.items():
            prefix = f"{name}/"
            m.load_state_dict({k[len(prefix) :]: v for k, v in snap.items() if k.startswith(prefix)})

    def fit(self, phases: list[Phase], train: torch.Tensor, val: torch.Tensor | None = None) -> TrainResult:
        """Train through `phases` on `train` (N, C, H, W); `val` feeds each phase's val_loss."""
        cfg = self.config
        if len(train) == 0:
            raise ValueError("training needs at least one image")
        if cfg.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
        path = Path(cfg.checkpoint) if cfg.checkpoint else None
        signature = self._signature(phases, len(train))
        result = TrainResult()
        # position: phase index and epochs finished in it; per-phase best val loss and bad-epoch count
        pos = {"phase": 0, "epoch": 0, "best_val": None, "bad_epochs": 0, "phase_seconds": 0.0}
        best: dict[str, torch.Tensor] | None = None
        previous_seconds = 0.0
        if cfg.resume and path is not None and path.is_file():
            header, best = self._load(path, phases, signature)
            pos = header["position"]
            result.history = header["history"]
            previous_seconds = header["seconds"]
            result.resumed_from = f"{phases[min(pos['phase'], len(phases) - 1)].name}:{pos['epoch']}"
            if header.get("stopped") is not None:  # the checkpointed run had already finished
                result.stopped, result.seconds = header["stopped"], previous_seconds
                return result
        start = time.perf_counter()
        notes: list[str] = [] if result.resumed_from is None else header.get("notes", [])

        def save(stopped: str | None = None) -> None:
            if path is not None:
                self._save(
                    path,
                    phases,
                    {
                        "signature": signature,
                        "position": pos,
                        "history": result.history,
                        "seconds": previous_seconds + time.perf_counter() - start,
                        "notes": notes,
                        "stopped": stopped,
                    },
                    best,
                )

        for pi in range(pos["phase"], len(phases)):
            phase = phases[pi]
            use_val = phase.val_loss is not None and val is not None and len(val) > 0
            phase_start = time.perf_counter() - pos["phase_seconds"]
            # a phase may use its share of the budget, and never more than what is left of it
            left = cfg.max_minutes * 60 - (previous_seconds + time.perf_counter() - start)
            deadline = (
                min(phase_start + cfg.max_minutes * 60 * phase.time_share, time.perf_counter() + left)
                if cfg.max_minutes > 0
                else math.inf
            )
            steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
            out_of_time = False
            if phase.on_start is not None and pos["epoch"] == 0:
                for m in self.modules.values():
                    m.eval()
                with torch.no_grad():
                    phase.on_start(train)
            with progress_bar(
                steps_per_epoch * phase.epochs, f"{cfg.desc}: {phase.name}", enabled=cfg.progress, unit="step"
            ) as bar:
                if bar is not None:
                    bar.update(steps_per_epoch * pos["epoch"])
                for epoch in range(pos["epoch"], phase.epochs):
                    epoch_seed = _epoch_seed(cfg.seed, pi, epoch)
                    torch.manual_seed(epoch_seed)  # noise, dropout, augmentation: same draws after a resume
                    generator = torch.Generator().manual_seed(epoch_seed)
                    for name, m in self.modules.items():
                        m.train(phase.train_modules is None or name in phase.train_modules)
                    epoch_start = time.perf_counter()
                    sums: dict[str, float] = {}
                    n_seen = 0
                    self.ctx.epoch = epoch
                    for i, x in enumerate(self._batches(train, generator)):
                        self.ctx.step = epoch * steps_per_epoch + i
                        if cfg.augment:
                            x = augment_batch(x, cfg.augment)
                        losses = phase.step(x, self.ctx)
                        for k, v in losses.items():
                            sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) * len(
                                x
                            )
                        n_seen += len(x)
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(
                                epoch=f"{epoch + 1}/{phase.epochs}",
                                loss=f"{sums.get('loss', next(iter(sums.values()))) / n_seen:.4g}",
                            )
                        if time.perf_counter() > deadline:
                            out_of_time = True
                            break
                    row: dict[str, Any] = {
                        "phase": phase.name,
                        "epoch": epoch + 1,
                        **{k: v / n_seen for k, v in sums.items()},
                    }
                    if use_val:
                        row["val_loss"] = self._validate(phase, val)
                        if pos["best_val"] is None or row["val_loss"] < pos["best_val"]:
                            pos["best_val"], pos["bad_epochs"] = row["val_loss"], 0
                            best = self._snapshot()
                        else:
                            pos["bad_epochs"] += 1
                        if bar is not None:
                            bar.set_postfix(
                                epoch=f"{epoch + 1}/{phase.epochs}",
                                loss=f"{row.get('loss', 0):.4g}",
                                val=f"{row['val_loss']:.4g}",
                            )
                    row["seconds"] = round(time.perf_counter() - epoch_start, 3)
                    result.history.append(row)
                    if out_of_time:
                        # a cut-short epoch is not checkpointed: resume redoes it from the last full one
                        notes.append(f"time budget ({phase.name})")
                        break
                    pos.update(epoch=epoch + 1, phase_seconds=time.perf_counter() - phase_start)
                    if use_val and phase.patience > 0 and pos["bad_epochs"] >= phase.patience:
                        notes.append(f"early stopping ({phase.name})")
                        break
                    if epoch + 1 < phase.epochs:
                        save()
            if use_val and best is not None:
                self._restore_snapshot(best)  # the phase ends on its best validation weights
            pos = {"phase": pi + 1, "epoch": 0, "best_val": None, "bad_epochs": 0, "phase_seconds": 0.0}
            best = None
            if pi + 1 < len(phases):
                save()
        for m in self.modules.values():
            m.eval()
        result.seconds = previous_seconds + time.perf_counter() - start
        result.stopped = "; ".join(notes) or "completed"
        save(result.stopped)
        return result
