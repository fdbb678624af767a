"""Image representations for the classical (PyOD) detectors, chosen per run with `features`.

| `features` | vector per image |
|---|---|
| `raw` | pixels resized to `pixel_size` x `pixel_size` (grayscale unless `color=true`), flattened |
| `pca:K` | those pixels projected on K principal components (randomized PCA) |
| `kpca-rbf:K`, `kpca-poly:K`, `kpca-sigmoid:K`, `kpca-cosine:K` (`kpca:K` = rbf) | kernel PCA of the pixels |
| `deep`, `deep:1+2+3+4` | global average pooling of backbone stages (default 1..4 of Lite0), concatenated |
| `patch`, `patch:2+3` | one vector per stride-8 patch: PatchCore's locally aware embedding of stages 2+3 |

Everything is fitted on the training goods only and its fitted state is plain arrays (PCA mean and
components, kernel-PCA fit data, scaled eigenvectors and centering terms) plus JSON metadata, so
it goes into the safetensors model file without pickle and transforms new images identically
after loading. The transforms are computed here (a few lines of numpy) rather than by the
scikit-learn objects, so a model file does not depend on scikit-learn's private attributes;
tests check they agree with scikit-learn's `PCA.transform` / `KernelPCA.transform`.

Memory at plant scale: pixel vectors of the training images are held once (float32, or float16
when N x D x 4 bytes would pass `HOLD_FLOAT32_BYTES`), the projections are fitted on a seeded
subsample (`pca_max_samples`, `kpca_max_samples`) and applied in chunks.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from anomalens.models.components.features import patch_grid, pooled_features

log = logging.getLogger(__name__)

KPCA_KERNELS = ("rbf", "poly", "sigmoid", "cosine")
DEFAULT_DEEP_LAYERS = (1, 2, 3, 4)
DEFAULT_PATCH_LAYERS = (2, 3)
#: above this many bytes the training pixel vectors are held as float16 instead of float32
HOLD_FLOAT32_BYTES = 2 * 1024**3
#: rows per chunk when projecting held pixel vectors
CHUNK_ROWS = 1024
FEATURES_HELP = (
    "raw, pca:K, kpca-rbf:K (also kpca-poly, kpca-sigmoid, kpca-cosine), deep[:1+2+3+4] or patch[:2+3]"
)

_SPEC_RE = re.compile(r"^(raw|pca|kpca(?:-(\w+))?|deep|patch)(?::(.+))?$")


@dataclass(frozen=True)
class FeatureSpec:
    """A parsed `features` option (see the module docstring for the grammar)."""

    kind: str  # raw | pca | kpca | deep | patch
    n_components: int = 0
    kernel: str = ""
    layers: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> FeatureSpec:
        t = str(text).strip().lower()
        m = _SPEC_RE.match(t)
        bad = ValueError(f"features {text!r} not understood: use {FEATURES_HELP}")
        if not m:
            raise bad
        head, kernel, arg = m.group(1), m.group(2), m.group(3)
        if head == "raw":
            if arg:
                raise bad
            return cls("raw")
        if head.startswith("pca") or head.startswith("kpca"):
            if not arg or not arg.isdigit() or int(arg) < 1:
                raise ValueError(f"features {text!r}: give the number of components, e.g. {head}:300")
            if head == "pca":
                return cls("pca", int(arg))
            kernel = kernel or "rbf"
            if kernel not in KPCA_KERNELS:
                raise ValueError(
                    f"features {text!r}: kernel {kernel!r} unknown, use one of {', '.join(KPCA_KERNELS)}"
                )
            return cls("kpca", int(arg), kernel)
        layers = DEFAULT_DEEP_LAYERS if head == "deep" else DEFAULT_PATCH_LAYERS
        if arg:
            parts = arg.split("+")
            if not all(p.isdigit() for p in parts):
                raise ValueError(
                    f"features {text!r}: layers are stage indices joined by '+', e.g. {head}:2+3"
                )
            layers = tuple(sorted({int(p) for p in parts}))
        return cls(head, layers=layers)

    def __str__(self) -> str:
        if self.kind == "raw":
            return "raw"
        if self.kind == "pca":
            return f"pca:{self.n_components}"
        if self.kind == "kpca":
            return f"kpca-{self.kernel}:{self.n_components}"
        default = DEFAULT_DEEP_LAYERS if self.kind == "deep" else DEFAULT_PATCH_LAYERS
        return self.kind if self.layers == default else f"{self.kind}:{'+'.join(map(str, self.layers))}"

    @property
    def uses_pixels(self) -> bool:
        return self.kind in ("raw", "pca", "kpca")

    @property
    def uses_backbone(self) -> bool:
        return self.kind in ("deep", "patch")

    @property
    def is_patch(self) -> bool:
        return self.kind == "patch"


def check_features(x: np.ndarray, what: str) -> None:
    """Clear one-line errors for degenerate training matrices (NaN, all identical)."""
    if x.shape[0] == 0:
        raise ValueError(f"{what}: no training vectors")
    chunk = 4096
    finite = all(np.isfinite(x[i : i + chunk]).all() for i in range(0, x.shape[0], chunk))
    if not finite:
        raise ValueError(
            f"{what}: the training features contain NaN or inf: check the training images "
            "(NaN pixels, corrupt files) or the backbone weights"
        )
    if x.shape[0] > 1:
        first = x[:1]
        same = all(not (x[i : i + chunk] != first).any() for i in range(0, x.shape[0], chunk))
        if same:
            raise ValueError(
                f"{what}: all {x.shape[0]} training images give identical features, nothing to learn "
                "from: fit on varied good images (are they copies of one picture?)"
            )


def subsample_indices(n: int, cap: int, seed: int, salt: int = 0) -> np.ndarray:
    """Sorted seeded subsample of range(n) of size `cap` (all of them when cap <= 0 or n <= cap)."""
    if cap <= 0 or n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, salt]).choice(n, size=cap, replace=False))


# -- projections -----------------------------------------------------------------------------------
class PCAProjection:
    """Linear PCA: x -> (x - mean) @ components.T, fitted with scikit-learn's randomized solver."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, meta: dict[str, Any] | None = None) -> None:
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.components = np.ascontiguousarray(components, dtype=np.float32)
        self.meta = meta or {}

    @classmethod
    def fit(cls, x: np.ndarray, k: int, seed: int) -> PCAProjection:
        from sklearn.decomposition import PCA

        solver = "randomized" if k < 0.8 * min(x.shape) else "full"
        pca = PCA(n_components=k, svd_solver=solver, random_state=seed).fit(x.astype(np.float32, copy=False))
        return cls(
            pca.mean_,
            pca.components_,
            {"explained_variance": float(pca.explained_variance_ratio_.sum()), "solver": solver},
        )

    def transform(self, x: np.ndarray) -> np.ndarray:
        out = np.empty((x.shape[0], self.components.shape[0]), dtype=np.float32)
        for i in range(0, x.shape[0], CHUNK_ROWS):
            out[i : i + CHUNK_ROWS] = (
                x[i : i + CHUNK_ROWS].astype(np.float32) - self.mean
            ) @ self.components.T
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {"pca_mean": self.mean, "pca_components": self.components}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> PCAProjection:
        return cls(arrays["pca_mean"], arrays["pca_components"], meta)


class KernelPCAProjection:
    """Kernel PCA (eigen-decomposition by scikit-learn's KernelPCA); the transform is kept as
    arrays: the fit data, the eigenvectors scaled by 1/sqrt(eigenvalue), and the centering terms."""

    def __init__(
        self,
        kernel: str,
        params: dict[str, float],
        fit_data: np.ndarray,
        scaled_alphas: np.ndarray,
        fit_rows: np.ndarray,
        fit_all: float,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.kernel = kernel
        self.params = dict(params)
        self.fit_data = np.ascontiguousarray(fit_data, dtype=np.float32)
        self.scaled_alphas = np.ascontiguousarray(scaled_alphas, dtype=np.float64)
        self.fit_rows = np.ascontiguousarray(fit_rows, dtype=np.float64)
        self.fit_all = float(fit_all)
        self.meta = meta or {}

    @staticmethod
    def kernel_params(kernel: str, x: np.ndarray, seed: int) -> dict[str, float]:
        d = x.shape[1]
        if kernel == "rbf":
            # median heuristic: gamma = 1 / median squared distance between training vectors
            from sklearn.metrics.pairwise import euclidean_distances

            idx = subsample_indices(x.shape[0], 500, seed, salt=3)
            sq = euclidean_distances(x[idx].astype(np.float64), squared=True)
            med = float(np.median(sq[np.triu_indices(len(idx), 1)])) if len(idx) > 1 else 0.0
            return {"gamma": 1.0 / med if med > 0 else 1.0 / d}
        if kernel == "poly":
            return {"gamma": 1.0 / d, "degree": 3, "coef0": 1.0}
        if kernel == "sigmoid":
            return {"gamma": 1.0 / d, "coef0": 1.0}
        return {}

    def _kernel(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        from sklearn.metrics.pairwise import pairwise_kernels

        return pairwise_kernels(
            x.astype(np.float64), y.astype(np.float64), metric=self.kernel, filter_params=True, **self.params
        )

    @classmethod
    def fit(cls, x: np.ndarray, k: int, kernel: str, seed: int) -> KernelPCAProjection:
        from sklearn.decomposition import KernelPCA

        params = cls.kernel_params(kernel, x, seed)
        x64 = x.astype(np.float64)
        kpca = KernelPCA(n_components=k, kernel=kernel, random_state=seed, **params).fit(x64)
        vals, vecs = kpca.eigenvalues_, kpca.eigenvectors_
        keep = vals > 0
        scaled = np.zeros_like(vecs)
        scaled[:, keep] = vecs[:, keep] / np.sqrt(vals[keep])
        proj = cls(kernel, params, x, scaled, np.zeros(x.shape[0]), 0.0)
        kmat = proj._kernel(proj.fit_data, proj.fit_data)  # the centering terms of sklearn's KernelCenterer
        proj.fit_rows = kmat.mean(axis=0)
        proj.fit_all = float(proj.fit_rows.mean())
        proj.meta = {"n_fit": int(x.shape[0]), "n_positive_eigenvalues": int(keep.sum())}
        return proj

    def transform(self, x: np.ndarray) -> np.ndarray:
        out = np.empty((x.shape[0], self.scaled_alphas.shape[1]), dtype=np.float32)
        for i in range(0, x.shape[0], CHUNK_ROWS):
            kmat = self._kernel(x[i : i + CHUNK_ROWS], self.fit_data)
            kmat -= self.fit_rows
            kmat -= kmat.mean(axis=1, keepdims=True)
            kmat += self.fit_all
            out[i : i + CHUNK_ROWS] = kmat @ self.scaled_alphas
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "kpca_fit_data": self.fit_data,
            "kpca_scaled_alphas": self.scaled_alphas,
            "kpca_fit_rows": self.fit_rows,
        }

    def state_meta(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "params": self.params, "fit_all": self.fit_all, **self.meta}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> KernelPCAProjection:
        return cls(
            meta["kernel"],
            meta["params"],
            arrays["kpca_fit_data"],
            arrays["kpca_scaled_alphas"],
            arrays["kpca_fit_rows"],
            meta["fit_all"],
            {k: v for k, v in meta.items() if k not in ("kernel", "params", "fit_all")},
        )


# -- the representation ----------------------------------------------------------------------------
FeatureFn = Callable[[torch.Tensor], list[torch.Tensor]]


class Representation:
    """Pixels / PCA / kernel PCA / pooled deep features / patch embeddings of preprocessed batches.

    Fitting is streamed: `start(n_images)`, `add(pixels)` per batch, then `finish()` fits the
    projection (on a seeded subsample) and returns the training matrix, (N, d) float32 (for
    `patch`: a seeded subsample of the training patches, (P, d)).
    """

    def __init__(
        self,
        spec: FeatureSpec,
        *,
        seed: int = 0,
        pca_max_samples: int = 5000,
        kpca_max_samples: int = 2000,
        max_patches: int = 20000,
        backbone: FeatureFn | None = None,
    ) -> None:
        self.spec = spec
        self.seed = seed
        self.pca_max_samples = pca_max_samples
        self.kpca_max_samples = kpca_max_samples
        self.max_patches = max_patches
        self.backbone = backbone
        self.projection: PCAProjection | KernelPCAProjection | None = None
        self.info: dict[str, Any] = {}
        self._rows: list[np.ndarray] = []
        self._held: np.ndarray | None = None
        self._n = 0
        self._n_images = 0

    # -- streaming fit -----------------------------------------------------------------------------
    def start(self, n_images: int) -> None:
        self._rows, self._held, self._n, self._n_images = [], None, 0, max(1, n_images)

    def _backbone(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        if self.backbone is None:
            raise RuntimeError(f"features {self.spec} need a backbone feature function")
        return self.backbone(pixels)

    def add(self, pixels: torch.Tensor) -> None:
        b = pixels.shape[0]
        if self.spec.uses_pixels:
            flat = pixels.reshape(b, -1).numpy()
            if self._held is None:
                d = flat.shape[1]
                dtype = np.float32 if self._n_images * d * 4 <= HOLD_FLOAT32_BYTES else np.float16
                self._held = np.empty((self._n_images, d), dtype=dtype)
            if self._n + b > self._held.shape[0]:  # more images than announced: grow
                grown = np.empty(
                    (max(self._n + b, 2 * self._held.shape[0]), self._held.shape[1]), self._held.dtype
                )
                grown[: self._n] = self._held[: self._n]
                self._held = grown
            self._held[self._n : self._n + b] = flat
        elif self.spec.kind == "deep":
            self._rows.append(pooled_features(self._backbone(pixels)).cpu().numpy().astype(np.float32))
        else:
            grid = patch_grid(self._backbone(pixels)).cpu().numpy()  # (B, h, w, D)
            _, h, w, d = grid.shape
            per_image = min(h * w, max(1, math.ceil(self.max_patches / self._n_images)))
            rng = np.random.default_rng([self.seed, 7, self._n])
            for i in range(b):
                pick = np.sort(rng.choice(h * w, size=per_image, replace=False))
                self._rows.append(grid[i].reshape(h * w, d)[pick].astype(np.float32))
            self.info["grid"] = [int(h), int(w)]
        self._n += b

    def finish(self) -> np.ndarray:
        """Fit the projection and return the training feature matrix."""
        spec = self.spec
        if self._n == 0:
            raise ValueError("fit got no images")
        if not spec.uses_pixels:
            x = np.concatenate(self._rows)
            self._rows = []
            self.info.update(n_images=self._n, dim=int(x.shape[1]))
            return x
        held, self._held = self._held[: self._n], None
        n, d = held.shape
        self.info.update(n_images=n, pixel_dim=int(d), held_dtype=str(held.dtype))
        check_features(held, f"pixels (features {spec})")
        if spec.kind == "raw":
            return held.astype(np.float32, copy=False)
        k = spec.n_components
        cap = self.pca_max_samples if spec.kind == "pca" else self.kpca_max_samples
        idx = subsample_indices(n, cap, self.seed, salt=1)
        if k > min(len(idx), d):
            if k > d:
                raise ValueError(
                    f"features {spec}: {k} components exceed the {d} pixel values per image: "
                    f"use {spec.kind}:{d} or fewer, or raise pixel_size"
                )
            what = (
                "training images"
                if len(idx) == n
                else f"images in the PCA subsample ({spec.kind}_max_samples)"
            )
            raise ValueError(
                f"features {spec} need at least {k} {what}, got {len(idx)}: use "
                f"{str(spec).split(':')[0]}:{len(idx)} or fewer components, or add good images"
            )
        start = time.perf_counter()
        sample = held[idx].astype(np.float32)
        if spec.kind == "pca":
            self.projection = PCAProjection.fit(sample, k, self.seed)
        else:
            self.projection = KernelPCAProjection.fit(sample, k, spec.kernel, self.seed)
            if self.projection.meta["n_positive_eigenvalues"] < k:
                raise ValueError(
                    f"features {spec}: the kernel matrix of the training images has only "
                    f"{self.projection.meta['n_positive_eigenvalues']} positive eigenvalues: use "
                    f"fewer components or more varied good images"
                )
        del sample
        fitted = time.perf_counter() - start
        x = self.projection.transform(held)
        self.info.update(
            projection_fit_rows=int(len(idx)),
            projection_fit_s=round(fitted, 3),
            projection_s=round(time.perf_counter() - start, 3),
        )
        log.info(
            "%s fitted on %d of %d images in %.1f s, projected in %.1f s",
            spec,
            len(idx),
            n,
            fitted,
            time.perf_counter() - start - fitted,
        )
        return x

    # -- inference ---------------------------------------------------------------------------------
    def transform(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, d) float32 vectors; for `patch`: (B, h, w, d) patch grids."""
        if self.spec.uses_pixels:
            flat = pixels.reshape(pixels.shape[0], -1).numpy().astype(np.float32)
            return flat if self.projection is None else self.projection.transform(flat)
        feats = self._backbone(pixels)
        out = pooled_features(feats) if self.spec.kind == "deep" else patch_grid(feats)
        return out.cpu().numpy().astype(np.float32)

    # -- state -------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        meta: dict[str, Any] = {"features": str(self.spec), "info": self.info}
        if isinstance(self.projection, PCAProjection):
            return self.projection.arrays(), {**meta, "pca": self.projection.meta}
        if isinstance(self.projection, KernelPCAProjection):
            return self.projection.arrays(), {**meta, "kpca": self.projection.state_meta()}
        return {}, meta

    def restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.info = dict(meta.get("info", {}))
        if self.spec.kind == "pca":
            self.projection = PCAProjection.from_arrays(arrays, meta.get("pca", {}))
        elif self.spec.kind == "kpca":
            self.projection = KernelPCAProjection.from_arrays(arrays, meta["kpca"])
