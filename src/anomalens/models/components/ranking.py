"""The Wilcoxon-Mann-Whitney ranking loss (Yan et al., ICML 2003), and its full-recall form
(VQGanoDIP, Bougaham et al. 2023): train a classifier for "miss no defect at the fewest false alarms"
rather than for accuracy."""

from __future__ import annotations

import torch


def wmw_loss(
    scores: torch.Tensor,
    labels: torch.Tensor,
    *,
    gamma: float = 0.3,
    power: float = 2.0,
    hardest: int | None = None,
) -> torch.Tensor:
    """Mean over (defect, good) pairs of ``max(0, gamma - (x - y)) ** power``, x a defect's score
    and y a good's, scores in [0, 1]: zero once every defect outscores every good by `gamma`, a
    differentiable stand-in for 1 - AUROC.

    `hardest=k` keeps only the k lowest-scoring defects: the pairs that decide the threshold at 100 %
    recall, so the loss approximates the partial AUC over the full-recall range (k=1 is its limit).
    """
    labels = labels.bool()
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        raise ValueError("the WMW loss needs both defective and good images in the batch")
    if hardest is not None:
        pos = pos.topk(min(int(hardest), len(pos)), largest=False).values
    return torch.clamp(gamma - (pos[:, None] - neg[None, :]), min=0).pow(power).mean()
