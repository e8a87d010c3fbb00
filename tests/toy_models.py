"""Small models for the library tests: an adaLN-Zero transformer shaped like SiT/DiT, built in-file."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class ToyBlock(nn.Module):
    """Pre-norm attention + MLP block with adaLN modulation; called as block(x, c) like SiT."""

    def __init__(self, dim: int, heads: int = 2, zero_init: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim))
        if zero_init:
            nn.init.zeros_(self.ada[1].weight)
            nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale1, gate1, scale2, gate2 = self.ada(c).unsqueeze(1).chunk(4, dim=-1)
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x) * (1 + scale1)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + gate1 * self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2))


class ToyDiT(nn.Module):
    """Tokens in, tokens out: embed → blocks(x, c) → head. ``checkpointing`` wraps each block call."""

    def __init__(self, dim: int = 32, depth: int = 3, in_dim: int = 6, zero_init: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.cond = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(ToyBlock(dim, zero_init=zero_init) for _ in range(depth))
        self.head = nn.Linear(dim, in_dim)
        self.checkpointing: str | None = None  # None, "reentrant" or "non-reentrant"

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h, c = self.embed(x), self.cond(t[:, None])
        for block in self.blocks:
            if self.checkpointing and self.training:
                h = checkpoint(block, h, c, use_reentrant=self.checkpointing == "reentrant")
            else:
                h = block(h, c)
        return self.head(h)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, scale: float) -> torch.Tensor:
        # Two passes, like classifier-free guidance: both go through the hooked blocks.
        cond, uncond = self.forward(x, t), self.forward(x, torch.zeros_like(t))
        return uncond + scale * (cond - uncond)


def reference_anm(model: ToyDiT, x, t, alpha, lam, weight=1.0, site="update", rms=False):
    """Hook-free re-implementation of the default ANM term on ToyDiT, returns (output, anm loss)."""
    h, c = model.embed(x), model.cond(t[:, None])
    terms = []
    for block in model.blocks:
        new = block(h, c)
        activation = new - h if site == "update" else new
        norm = torch.linalg.vector_norm(activation, dim=-1, dtype=torch.float32)
        if rms:
            norm = norm / activation.shape[-1] ** 0.5
        terms.append(torch.relu(1 - norm / alpha).reshape(-1))
        h = new
    return model.head(h), lam * weight * torch.cat(terms).mean()


def make_batch(batch: int = 4, tokens: int = 5, in_dim: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, in_dim, generator=gen), torch.rand(batch, generator=gen)
