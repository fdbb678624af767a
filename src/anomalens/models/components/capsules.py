"""Capsule pieces (Sabour, Frosst, Hinton, "Dynamic routing between capsules", NeurIPS 2017) shared by
PIADE's routed bottleneck (`components.pyramid.DynamicRouting`) and the capsule network (`capsnet`):
the squash non-linearity and routing by agreement, unrolled over a fixed number of iterations so
the graph is static (ONNX-exportable)."""

from __future__ import annotations

import torch


def squash(s: torch.Tensor, dim: int) -> torch.Tensor:
    """Sabour et al.'s capsule non-linearity: |s|^2 / (1 + |s|^2) * s / |s| (length below 1)."""
    sq = (s * s).sum(dim=dim, keepdim=True)
    return sq / (1 + sq) * s / torch.sqrt(sq + 1e-8)


def route_by_agreement(u_hat: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sabour et al.'s Procedure 1 on predictions u_hat (B, N_in, N_out, D, *grid), u_j|i = W_ij u_i.

    The coupling coefficients c_ij = softmax_j(b_ij) (each input capsule's sum to one over the
    parent capsules), the parents v_j = squash(sum_i c_ij u_j|i), and b_ij grows by the agreement
    u_j|i . v_j, from b = 0, for `iterations` iterations. Any trailing grid dimensions are routed
    apart (PIADE routes at every position). Returns v (B, N_out, D, *grid) and c (B, N_in, N_out, *grid).
    """
    logits = torch.zeros_like(u_hat[:, :, :, 0])
    for it in range(iterations):
        c = torch.softmax(logits, dim=2)
        v = squash((c.unsqueeze(3) * u_hat).sum(dim=1), dim=2)
        if it + 1 < iterations:
            logits = logits + (u_hat * v.unsqueeze(1)).sum(dim=3)
    return v, c
