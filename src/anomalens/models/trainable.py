"""Base class of detectors trained by gradient descent (autoencoder, GANs, distillation, ...).

`TrainableDetector` keeps the preprocessed training goods in memory, holds out its own
validation goods (`validation_fraction` of the goods left after the calibration share; never the
calibration goods, whose threshold would otherwise be taken on images the model was selected on),
builds the model's modules and runs `anomalens.models.training.Trainer` over the phases the
subclass defines. It adds the options every trainable method shares (epochs, min_steps, lr,
max_minutes, patience, validation_fraction, augment, amp) and
the fit-time arguments `checkpoint_dir` and `resume`. Saving writes every module's state_dict
(safetensors); loading rebuilds the modules from the options and loads them back.

A subclass implements three hooks (plus `defaults` and `name`)::

    @register
    class MyAE(TrainableDetector):
        name = "my_ae"
        defaults = {"channels": 3, "width": 32, "epochs": 30, "lr": 2e-4}

        def _build_modules(self) -> dict[str, nn.Module]:      # fresh, untrained modules
            return {"net": Net(self.options["channels"], self.options["width"])}

        def _phases(self) -> list[Phase]:                       # what to train, on self.modules
            net = self.modules["net"]
            opt = torch.optim.Adam(net.parameters(), lr=self.options["lr"])
            def step(x, ctx):
                with ctx.autocast():
                    loss = F.mse_loss(net(x), x)
                ctx.update(loss, opt)
                return {"loss": loss}
            return [self.phase("train", step, {"adam": opt}, val_loss=lambda x: F.mse_loss(net(x), x))]

        def _scorer(self) -> nn.Module:                         # pixels -> (scores (B,), maps (B,S,S))
            return MyModel(self.modules["net"])

    det = MyAE(epochs=5).fit(goods, checkpoint_dir="ckpt", resume=True, progress=True)

`self.phase(...)` fills epochs and patience from the options. `_scorer()` is used both for
scoring and, deep-copied to the CPU, as `inference_module()` for ONNX export. Images are
normalized to [-1, 1] with the `channels` option (3 where a subclass has none); override
`_preprocess` for other normalizations (e.g. a pretrained backbone's mean/std).
"""

from __future__ import annotations

import copy
import math
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from anomalens.data.inputs import Batch, InputItem, Preprocess, iter_batches
from anomalens.models.base import Detector, split_items
from anomalens.models.feature_base import BackboneDetector
from anomalens.models.training import Phase, StepFn, TrainConfig, Trainer, parse_augment


def check_choice(name: str, option: str, value: str, choices: tuple[str, ...]) -> None:
    """Fail at construction, naming the choices, when a text option is not one of them."""
    if value not in choices:
        raise ValueError(f"{name}: option {option}={value!r}; use one of {', '.join(choices)}")


#: the fewest validation goods worth a validation loss (fewer: none, see _hold_out_validation)
VALIDATION_MIN_IMAGES = 1


class TrainableDetector(Detector):
    """Detector whose model is learned by the shared training engine."""

    stochastic = True  # initialisation and shuffling follow `seed`: benchmarks repeat seeds
    refits_cheaply = False  # a leave-one-out calibration would train once per good
    base_defaults = {
        **Detector.base_defaults,
        "image_size": 128,
        "batch_size": 16,
        "epochs": 50,
        # small training sets: every phase's epochs scale up alike until the `epochs` phase runs at
        # least this many steps (31 images at batch 16 are 2 steps an epoch); 0 = epochs as given
        "min_steps": 0,
        "lr": 1e-3,
        "max_minutes": 0.0,  # wall-clock training budget; 0 = none
        "patience": 0,  # early stopping after this many epochs without a better validation loss; 0 = off
        # goods held out (after the calibration ones) for the validation loss, best epoch and
        # normalization; none when that would leave fewer than VALIDATION_MIN_IMAGES
        "validation_fraction": 0.1,
        "augment": "",  # training augmentations, comma-separated: flip, rotate, noise
        "amp": True,  # bfloat16 mixed precision on CUDA
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._validation_items: list[InputItem] = []
        parse_augment(self.options["augment"])  # fail at construction, not after reading images
        for key in ("epochs", "batch_size"):
            if self.options[key] < 1:
                raise ValueError(f"{self.name}: option {key} must be >= 1, got {self.options[key]}")
        if self.options["min_steps"] < 0:
            raise ValueError(f"{self.name}: option min_steps must be >= 0, got {self.options['min_steps']}")
        self.modules: dict[str, nn.Module] = {}
        self._n_train = 0  # training images of the current fit
        self._checkpoint_dir: Path | None = None
        self._resume = False

    # -- hooks -------------------------------------------------------------------------------
    @abstractmethod
    def _build_modules(self) -> dict[str, nn.Module]:
        """Fresh modules of this model, built from the options."""

    @abstractmethod
    def _phases(self) -> list[Phase]:
        """The training phases over `self.modules` (already on the device)."""

    @abstractmethod
    def _scorer(self) -> nn.Module:
        """Module over `self.modules` mapping preprocessed pixels to (scores (B,), maps (B, S, S))."""

    # -- plumbing ----------------------------------------------------------------------------
    def fit(
        self,
        images: Iterable | np.ndarray,
        calibration: Iterable | np.ndarray | None = None,
        *,
        progress: bool = False,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        defects: Iterable | np.ndarray | None = None,
        defect_masks: Sequence | None = None,
    ) -> TrainableDetector:
        """Like `Detector.fit`; `checkpoint_dir` gets a checkpoint after every epoch, and `resume`
        continues from the one there (same options and images) instead of starting over."""
        if resume and checkpoint_dir is None:
            raise ValueError(f"{self.name}: resume needs the checkpoint_dir of the interrupted run")
        self._checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self._resume = resume
        return super().fit(images, calibration, progress=progress, defects=defects, defect_masks=defect_masks)

    @property
    def checkpoint_path(self) -> Path | None:
        return (
            None if self._checkpoint_dir is None else self._checkpoint_dir / f"{self.name}.ckpt.safetensors"
        )

    def _preprocess(self) -> Preprocess:
        channels = self.options.get("channels", 3)
        return Preprocess(
            self.input_side,
            channels,
            (0.5,) * channels,
            (0.5,) * channels,
            self.options["intensity"],
        )

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self._n_train / self.options["batch_size"])

    def phase_epochs(self, epochs: int) -> int:
        """`epochs` scaled up by the min_steps factor of this training set (see the option)."""
        o = self.options
        if not o["min_steps"] or not self._n_train:  # off, or phases built outside a fit (tests, tools)
            return epochs
        return max(epochs, math.ceil(epochs * o["min_steps"] / (o["epochs"] * self.steps_per_epoch)))

    def phase(
        self, name: str, step: StepFn, optimizers: dict[str, torch.optim.Optimizer], **kwargs: Any
    ) -> Phase:
        """A Phase with epochs (scaled by `phase_epochs`) and patience from the options unless given."""
        kwargs["epochs"] = self.phase_epochs(kwargs.get("epochs", self.options["epochs"]))
        kwargs.setdefault("patience", self.options["patience"])
        return Phase(name, step, optimizers=optimizers, **kwargs)

    def loss_phase(
        self,
        name: str,
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        optimizers: dict[str, torch.optim.Optimizer],
    ) -> Phase:
        """The common case: one optimizer ({name: optimizer}) minimizing one loss, which is also
        the validation loss."""
        (opt,) = optimizers.values()

        def step(x: torch.Tensor, ctx) -> dict[str, torch.Tensor]:
            with ctx.autocast():
                loss = loss_fn(x)
            ctx.update(loss, opt)
            return {"loss": loss.detach()}

        return self.phase(name, step, optimizers, val_loss=loss_fn)

    def _hold_out_validation(self, items: list[InputItem]) -> list[InputItem]:
        """Validation goods apart from both the training and the calibration goods. Small sets keep
        every good for training: with fewer than VALIDATION_MIN_IMAGES validation goods there is
        no validation (training runs its epochs; the last epoch is kept)."""
        n_val = round(self.options["validation_fraction"] * len(items))
        self._validation_items = []
        if n_val >= VALIDATION_MIN_IMAGES and len(items) - n_val >= 2:
            items, self._validation_items = split_items(
                items, self.options["validation_fraction"], self.options["seed"] + 1
            )
        self.fit_info["n_validation"] = len(self._validation_items)
        return items

    def _set_modules(self, modules: dict[str, nn.Module]) -> None:
        self.modules = {k: m.to(self.device).eval() for k, m in modules.items()}

    def _fit_batches(self, batches: Iterable[Batch], n_images: int) -> None:
        train = torch.cat([b.pixels for b in batches])
        val_batches = [b.pixels for b in self._validation_batches()]
        self._train(train, torch.cat(val_batches) if val_batches else None)

    def _validation_batches(self) -> Iterator[Batch]:
        """The held-out validation goods, preprocessed, in batches."""
        return iter_batches(self._validation_items, self.preprocess(), self.options["batch_size"])

    def _train(self, train: torch.Tensor, val: torch.Tensor | None) -> None:
        """Fresh modules trained by the engine on `train` (what the phases' steps take: pixels, or
        cached features), `val` feeding the validation loss."""
        self._n_train = len(train)
        self._set_modules(self._build_modules())
        config = TrainConfig(
            batch_size=self.options["batch_size"],
            seed=self.options["seed"],
            device=self.device,
            amp=self.options["amp"],
            checkpoint=self.checkpoint_path,
            resume=self._resume,
            max_minutes=self.options["max_minutes"],
            progress=self._show_progress,
            desc=self.name,
            augment=parse_augment(self.options["augment"]),
        )
        result = Trainer(self.modules, config).fit(self._phases(), train, val)
        self.fit_info.update(training=result.summary(), history=result.history)

    @torch.inference_mode()
    def _score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = self._scorer()(pixels.to(self.device))
        return scores.float().cpu().numpy(), maps.float().cpu().numpy()

    def inference_module(self) -> nn.Module:
        return copy.deepcopy(self._scorer()).cpu().eval()

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {
            f"{name}/{k}": v.detach().cpu().numpy()
            for name, m in self.modules.items()
            for k, v in m.state_dict().items()
        }
        return arrays, {}

    def _restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        # the networks the options describe, built on the meta device (no memory): a file whose
        # arrays do not match them in name and shape is refused before anything is allocated
        # (a 0-d buffer such as a batch-norm count is saved with shape (1,))
        with torch.device("meta"):
            expected = {
                f"{name}/{k}": tuple(v.shape) or (1,)
                for name, m in self._build_modules().items()
                for k, v in m.state_dict().items()
            }
        given = {k: tuple(v.shape) or (1,) for k, v in arrays.items()}
        for key, shape in expected.items():
            if given.get(key) != shape:
                found = "missing" if key not in given else f"of shape {given[key]}"
                raise ValueError(f"array '{key}' is {found}; the options give {shape}")
        modules = self._build_modules()
        for name, m in modules.items():
            prefix = f"{name}/"
            m.load_state_dict(
                {k[len(prefix) :]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith(prefix)}
            )
        self._set_modules(modules)


class BackboneTrainableDetector(TrainableDetector, BackboneDetector):
    """A TrainableDetector whose model uses the frozen pretrained backbone (`self.extractor`).

    The backbone's weights are not saved: like PatchCore, the model file keeps their checksum
    and loading checks it. Pixels are normalized with the backbone's mean/std. The backbone runs
    inside the trained model's torch graph, so BackboneDetector's `engine` option does not apply.
    """

    base_defaults = {
        **TrainableDetector.base_defaults,
        **{k: v for k, v in BackboneDetector.base_defaults.items() if k != "engine"},
        "image_size": 256,
        "batch_size": 8,
    }

    def _preprocess(self) -> Preprocess:
        return BackboneDetector._preprocess(self)

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, meta = super()._state()
        return arrays, {**meta, **self._backbone_state()}

    def _restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self._restore_backbone(meta)
        _ = self.extractor  # built for real before the networks on it are sized on the meta device
        super()._restore(arrays, meta)
