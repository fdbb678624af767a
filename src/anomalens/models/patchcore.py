"""PatchCore (Roth et al., CVPR 2022): a coreset memory of locally aware patch features.

Inference compute lives in `PatchCoreModel` (a plain nn.Module that exports to ONNX as it is);
`PatchCore` holds the fitting: streaming feature extraction and a chunked greedy coreset.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import faiss
import numpy as np
import torch
from torch import nn

from anomalens.data.inputs import Batch
from anomalens.data.progress import progress_bar
from anomalens.models.components.features import locally_aware_embedding
from anomalens.models.components.layers import SmoothUpsample
from anomalens.models.feature_base import BackboneDetector
from anomalens.registry import register


class PatchCoreModel(nn.Module):
    """Features -> nearest memory patch -> reweighted image score and smoothed pixel map."""

    def __init__(
        self,
        memory_bank: torch.Tensor,
        bank_support: torch.Tensor,
        image_size: int | tuple[int, int],
        sigma: float = 4.0,
        top_k: int = 0,
    ) -> None:
        super().__init__()
        self.register_buffer("memory_bank", memory_bank)
        # (M, k): each memory entry's k nearest memory entries (itself first), fixed once fitted
        self.register_buffer("bank_support", bank_support)
        self.register_buffer("bank_sq_norm", (memory_bank * memory_bank).sum(dim=1))
        self.image_size = image_size
        self.top_k = top_k
        self.upsample = SmoothUpsample(image_size, sigma)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pure-torch path (exact nearest neighbour): the ONNX export graph and the reference."""
        emb = locally_aware_embedding(features)
        flat = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
        # argmin of |m|^2 - 2 x.m (|x|^2 is the same for every m): one matmul and no (N, M, D)
        # tensor, which cdist becomes in ONNX; the distance itself is then recomputed exactly
        nn_idx = (self.bank_sq_norm - 2.0 * flat @ self.memory_bank.T).argmin(dim=1)
        return self.score(emb, self.distance_to(flat, nn_idx), nn_idx)

    def distance_to(self, flat: torch.Tensor, nn_idx: torch.Tensor) -> torch.Tensor:
        """Exact distance of each patch (N, D) to its memory entry: the expanded form's rounding
        error (large for near matches) would make the faiss and the exported path disagree."""
        return torch.linalg.vector_norm(flat - self.memory_bank[nn_idx], dim=1)

    def score(
        self, emb: torch.Tensor, nn_dist: torch.Tensor, nn_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) and maps (B, S, S) from each patch's nearest-memory distance.

        With top_k > 0 the image score is the mean of the top_k patch distances, steadier on
        textured parts where one noisy patch can outscore a small defect; with top_k = 0 it is the
        paper's reweighted maximum, which reads the support of the most anomalous patch only.
        """
        b, d, h, w = emb.shape
        patch = nn_dist.view(b, h * w)
        maps = self.upsample(patch.view(b, h, w))
        if self.top_k > 0:
            return patch.topk(min(self.top_k, h * w), dim=1).values.mean(dim=1), maps
        top = patch.argmax(dim=1)
        rows = torch.arange(b, device=emb.device) * (h * w) + top
        test_feat = emb.permute(0, 2, 3, 1).reshape(-1, d)[rows]  # (B, D)
        neighbours = self.memory_bank[self.bank_support[nn_idx[rows]]]  # (B, k, D)
        dists = torch.linalg.vector_norm(neighbours - test_feat.unsqueeze(1), dim=2)
        # paper's eq. 7: down-weight scores whose nearest memory patch sits in a dense neighbourhood
        weight = 1.0 - torch.softmax(dists, dim=1)[:, 0]
        return weight * patch.max(dim=1).values, maps


def greedy_coreset(
    features: torch.Tensor,
    n_select: int,
    projection_dim: int,
    seed: int,
    on_progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Indices of an approximate k-center coreset (PatchCore's greedy selection).

    Written here because neither faiss nor scikit-learn offers greedy k-center; distances run on
    a Johnson-Lindenstrauss random projection, as in the paper, to cut their cost.
    """
    n = features.shape[0]
    if n_select >= n:
        return torch.arange(n, device=features.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = features
    if projection_dim and projection_dim < features.shape[1]:
        proj = torch.randn(features.shape[1], projection_dim, generator=gen) / math.sqrt(projection_dim)
        x = features @ proj.to(features.device, features.dtype)
    sq = (x * x).sum(dim=1)
    selected = torch.empty(n_select, dtype=torch.long, device=features.device)
    idx = int(torch.randint(n, (1,), generator=gen))
    min_d = torch.full((n,), float("inf"), device=features.device, dtype=x.dtype)
    for i in range(n_select):
        selected[i] = idx
        c = x[idx]
        d = sq - 2.0 * (x @ c) + sq[idx]
        torch.minimum(min_d, d, out=min_d)
        idx = int(torch.argmax(min_d))
        if on_progress is not None and (i + 1) % 256 == 0:
            on_progress(256)
    return selected


@register
class PatchCore(BackboneDetector):
    """PatchCore: memory of nominal patch features; anomaly = distance to the nearest one.

    Options: coreset_ratio (fraction of all training patches kept, default 1 %),
    coreset_min_size (a floor so tiny training sets keep enough patches), num_neighbors
    (the paper's score reweighting, used when top_k=0), top_k (default 10: the image score is
    the mean of the 10 highest patch distances, which scored higher than the paper's reweighted
    maximum on both development sets; 0 restores the paper), projection_dim (coreset distances),
    chunk_patches (memory bound of the streaming coreset), sigma (map smoothing), runtime_precision
    (int8: an INT8 backbone calibrated on the training goods; see BackboneDetector).
    """

    name = "patchcore"
    square_input = False  # fully convolutional: any (H, W) canvas
    stochastic = True  # the coreset's random projection and start
    defaults = {
        "layers": (2, 3),
        "coreset_ratio": 0.01,
        "coreset_min_size": 1000,
        "num_neighbors": 9,
        "top_k": 10,
        "projection_dim": 64,
        "chunk_patches": 16384,
        "chunk_oversample": 4.0,
        "sigma": 4.0,
        "runtime_precision": "fp32",  # int8: INT8 backbone, calibrated on the training goods
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.model: PatchCoreModel | None = None
        self._index = None

    @property
    def map_score(self) -> dict:
        """The top_k score read off the map at patch resolution (the embedding's stride), or its maximum."""
        if self.options["top_k"] <= 0:
            return {"reduce": "max"}
        return {"reduce": "topk", "k": self.options["top_k"], "pool": int(self.extractor.strides[0])}

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return locally_aware_embedding(self.features(pixels.to(self.device)))

    def _coreset_size(self, n_patches: int) -> int:
        o = self.options
        return max(math.ceil(o["coreset_ratio"] * n_patches), min(n_patches, o["coreset_min_size"]))

    def _fit_batches(self, batches: Iterable[Batch], n_images: int) -> None:
        o = self.options
        kept: list[torch.Tensor] = []
        buffer: list[torch.Tensor] = []
        n_total = 0
        keep_ratio = 1.0

        def reduce_buffer() -> None:
            # Stage 1 keeps an oversampled coreset of each chunk, so memory stays bounded by
            # chunk_patches plus the candidates, however many images are given.
            chunk = torch.cat(buffer)
            buffer.clear()
            n_keep = max(1, math.ceil(keep_ratio * chunk.shape[0]))
            kept.append(chunk[greedy_coreset(chunk, n_keep, o["projection_dim"], o["seed"] + len(kept))])

        for batch in batches:
            emb = self._embed(batch.pixels)
            flat = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
            if n_total == 0:  # every image gives as many patches: the final size is known now
                expected = n_images * flat.shape[0] // batch.pixels.shape[0]
                keep_ratio = min(1.0, o["chunk_oversample"] * self._coreset_size(expected) / expected)
            n_total += flat.shape[0]
            buffer.append(flat)
            if sum(b.shape[0] for b in buffer) >= o["chunk_patches"]:
                reduce_buffer()
        if buffer:
            reduce_buffer() if kept else kept.append(torch.cat(buffer))
        candidates = torch.cat(kept)
        n_bank = self._coreset_size(n_total)
        with progress_bar(n_bank, "patchcore: coreset", enabled=self._show_progress, unit="patch") as bar:
            bank = candidates[
                greedy_coreset(
                    candidates,
                    n_bank,
                    o["projection_dim"],
                    o["seed"],
                    on_progress=bar.update if bar else None,
                )
            ]
        self._set_bank(bank.float().contiguous())
        self.fit_info.update(n_patches=n_total, memory_bank=int(bank.shape[0]))

    def _set_bank(self, bank: torch.Tensor) -> None:
        bank_np = bank.cpu().numpy()
        self._index = faiss.IndexFlatL2(bank_np.shape[1])
        self._index.add(bank_np)
        # the support neighbourhood of every memory entry never changes: look it up once
        _, support = self._index.search(bank_np, min(self.options["num_neighbors"], bank_np.shape[0]))
        self.model = (
            PatchCoreModel(
                bank,
                torch.from_numpy(support),
                self.input_size,
                self.options["sigma"],
                self.options["top_k"],
            )
            .to(self.device)
            .eval()
        )

    def _score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return self.score_features(self.features(pixels.to(self.device)))

    @torch.inference_mode()
    def score_features(self, features: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Scores and maps from backbone features (a multi-product model extracts them once)."""
        emb = locally_aware_embedding(features)
        flat = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).contiguous()
        _, idx = self._index.search(flat.cpu().numpy(), 1)
        nn_idx = torch.from_numpy(idx[:, 0]).to(self.device)
        scores, maps = self.model.score(emb, self.model.distance_to(flat, nn_idx), nn_idx)
        return scores.cpu().numpy(), maps.cpu().numpy()

    def inference_module(self) -> nn.Module:
        """Backbone + PatchCoreModel on the CPU (a copy: the detector keeps its device)."""
        return copy.deepcopy(nn.Sequential(self.extractor, self.model)).cpu().eval()

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {"memory_bank": self.model.memory_bank.cpu().numpy()}, self._backbone_state()

    def _restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self._restore_backbone(meta)
        self._set_bank(torch.from_numpy(arrays["memory_bank"]))
