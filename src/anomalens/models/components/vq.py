"""Vector quantization (van den Oord et al., "Neural Discrete Representation Learning", 2017), as
VQGAN uses it (Esser et al., "Taming Transformers", CVPR 2021): each latent vector is replaced by
its nearest codebook entry, gradients pass to the encoder straight through, and the codebook and
commitment terms of L_VQ come back per image."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Quantized(NamedTuple):
    """What `VectorQuantizer` returns for latents z_e (B, D, h, w)."""

    z_q: torch.Tensor  # (B, D, h, w): the codes in the forward pass, z_e's gradient in the backward
    indices: torch.Tensor  # (B, h, w): the nearest code of each position
    codebook: torch.Tensor  # (B,): ||sg[z_e] - z_q||^2 per image (mean over positions and dims)
    commitment: torch.Tensor  # (B,): ||z_e - sg[z_q]||^2 per image (same value, other gradient)
    distance: torch.Tensor  # (B, h, w): squared distance of each position to its code


class VectorQuantizer(nn.Module):
    """A codebook of `n_codes` vectors of size `dim`, uniformly initialised as in taming's code."""

    def __init__(self, n_codes: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_codes, dim)
        self.embedding.weight.data.uniform_(-1.0 / n_codes, 1.0 / n_codes)

    def forward(self, z_e: torch.Tensor) -> Quantized:
        b, d, h, w = z_e.shape
        flat = z_e.float().permute(0, 2, 3, 1).reshape(-1, d)
        codes = self.embedding.weight.float()
        # ||z||^2 - 2 z.c + ||c||^2 without the (N, K, D) difference tensor
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.T + codes.pow(2).sum(1)[None, :]
        indices = dist.argmin(1)
        q = codes[indices].view(b, h, w, d).permute(0, 3, 1, 2)
        z = z_e.float()
        codebook = (z.detach() - q).pow(2).flatten(1).mean(1)
        commitment = (z - q.detach()).pow(2).flatten(1).mean(1)
        distance = (z.detach() - q.detach()).pow(2).sum(1)
        z_q = z + (q - z).detach()  # straight-through: forward the code, backward the identity
        return Quantized(z_q.to(z_e.dtype), indices.view(b, h, w), codebook, commitment, distance)
