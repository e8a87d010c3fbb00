"""SiT: Scalable Interpolant Transformers (Ma et al., 2024), the DiT backbone trained with flow matching.

The parameter layout (state_dict keys and shapes) matches the public SiT reference code
(https://github.com/willisma/SiT), so the released `SiT-XL-2-256x256.pt` loads with
`load_official_checkpoint`. No timm dependency (patch embed, attention and MLP are defined below).

Time convention: t=0 is pure noise, t=1 is data (see modeling/transport.py).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # shift/scale are per sample (N, D); broadcast them over the token axis.
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Embeds continuous timesteps t in [0, 1] into vectors: sinusoidal feature -> MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(N,) times -> (N, dim) features [cos(t*f), sin(t*f)], f_i = max_period^(-i/half).

        Example: TimestepEmbedder.timestep_embedding(torch.rand(8), 256).shape == (8, 256)
        """
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        # t is used as is (no x1000 rescale): SiT feeds t in [0, 1], unlike DiT's integer steps.
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        # Follow the MLP's dtype so the embedder also works when the model is cast to bf16/fp16.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Embeds class labels; index num_classes is the null label used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        # As in the reference, the null row exists only when labels are dropped in training; this keeps
        # the table shape (and so checkpoint compatibility) identical for both settings.
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replaces labels by the null label, at random (training) or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(
        self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                      Patch Embedding, Attention and MLP                       #
#################################################################################


class PatchEmbed(nn.Module):
    """Cuts a (N, C, H, W) input into p x p patches and projects each to a token: (N, T, D), row-major."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # rearrange alone returns a (N, D, T)-strided view, and elementwise ops keep that layout, so the
        # whole residual stream would run with features strided by T (slower LayerNorms, linears and
        # per-token norms): copy it into token-major order once, here.
        return rearrange(self.proj(x), "n d h w -> n (h w) d").contiguous()


class Attention(nn.Module):
    """Multi-head self-attention (qkv with bias, output projection) on F.scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        # (N, T, 3D) -> 3 x (N, heads, T, head_dim); the 3 splits q, k, v in that order (reference layout).
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # default scale head_dim ** -0.5
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """Transformer MLP: Linear -> GELU(tanh) -> Linear, no dropout."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


#################################################################################
#                                 Core SiT Model                                #
#################################################################################


class SiTBlock(nn.Module):
    """A SiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.grad_checkpointing = False  # set through SiT.grad_checkpointing

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            # The body is checkpointed, not the module call: forward hooks on the block (ANM's) run outside
            # the checkpointed region. Inside it, torch.compile refuses a hook's side effect (it appends to a
            # list) and falls back to eager for SiT.forward as a whole, every block included.
            # Non-reentrant: works with inputs that do not require grad.
            return checkpoint(self._forward, x, c, use_reentrant=False)
        return self._forward(x, c)

    def _forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """The final layer of SiT: adaLN-modulated LayerNorm, then a projection to p*p*C_out per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SiT(nn.Module):
    """Diffusion/flow model with a Transformer backbone (DiT architecture, SiT conventions)."""

    def __init__(
        self,
        input_size: int = 32,  # latent side (256px images / 8 for the SD VAE)
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,  # label -> null probability in training (enables CFG)
        num_classes: int = 1000,
        learn_sigma: bool = False,  # True: 2*C output head like the released checkpoints (extra half unused)
    ):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding; a frozen Parameter (not a buffer) so that it sits in the state_dict
        # like the reference.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)

        self.blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def grad_checkpointing(self) -> bool:
        """Recompute each block's body in backward (less memory); in training forwards with autograd on only."""
        return any(block.grad_checkpointing for block in self.blocks)

    @grad_checkpointing.setter
    def grad_checkpointing(self, value: bool) -> None:
        for block in self.blocks:
            block.grad_checkpointing = bool(value)

    def initialize_weights(self) -> None:
        # Transformer layers: xavier-uniform weights, zero biases.
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        with torch.no_grad():
            pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
            self.pos_embed.copy_(pos_embed.to(self.pos_embed.device, self.pos_embed.dtype).unsqueeze(0))

        # Patch embedding initialised like a Linear on the flattened (C*p*p) input rather than as a Conv2d.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: zero gates make every block the identity and the zero output layer makes the model
        # predict 0 at initialisation, which is what lets deep DiT/SiT stacks train stably.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) tokens -> (N, C, H, W); each token's features are laid out as (p, p, C)."""
        c = self.out_channels
        p = self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1], "SiT works on square token grids"
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=h, w=w, p=p, q=p, c=c)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Predicts the model output (velocity for the default transport) for inputs x at times t, labels y.

        x: (N, C, H, W) latents; t: (N,) times in [0, 1] (0 = noise, 1 = data); y: (N,) class labels,
        where y == num_classes is the null label. Returns (N, in_channels, H, W).

        Example:
            model = create_model("SiT-S/8", input_size=32, num_classes=10)
            v = model(torch.randn(2, 4, 32, 32), torch.rand(2), torch.tensor([3, 7]))  # (2, 4, 32, 32)
        """
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H * W / p ** 2
        t = self.t_embedder(t)  # (N, D)
        y = self.y_embedder(y, self.training)  # (N, D)
        c = t + y  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D); checkpointed inside when grad_checkpointing is on
        x = self.final_layer(x, c)  # (N, T, p ** 2 * out_channels)
        x = self.unpatchify(x)  # (N, out_channels, H, W)
        if self.learn_sigma:
            # The released checkpoints carry a second (sigma) half that SiT never uses: keep the first C.
            x = x[:, : self.in_channels]
        return x

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        cfg_channels: int | None = None,
        guidance_interval: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """Classifier-free guided forward on a doubled batch: x = [z; z], y = [labels; null labels].

        Returns u + cfg_scale * (c - u) (c: conditional, u: unconditional output) on the first cfg_channels
        channels, repeated for both halves. cfg_channels=3 is the reference (DiT-compatible) choice that
        leaves channel 3 of SD-VAE's 4 unguided; cfg_channels=in_channels guides every channel like REPA.
        None: :func:`default_cfg_channels` (the reference's 3 for 4-channel latents, every channel otherwise).
        guidance_interval=(t_lo, t_hi) guides only samples with t_lo <= t <= t_hi (in this file's time,
        t=0 noise, t=1 data; REPA's interval [lo, hi] in its reversed time is (1 - hi, 1 - lo) here) and
        returns the conditional output elsewhere. Unguided channels keep each half's own output.

        Example:
            z = torch.randn(2, 4, 32, 32); y = torch.tensor([1, 2]); null = torch.full_like(y, 1000)
            t = torch.full((4,), 0.5)
            out = model.forward_with_cfg(torch.cat([z, z]), t, torch.cat([y, null]), cfg_scale=1.5)
            v = out[:2]  # guided velocity of z
        """
        cfg_channels = default_cfg_channels(self.in_channels) if cfg_channels is None else cfg_channels
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        guided, rest = model_out[:, :cfg_channels], model_out[:, cfg_channels:]
        cond, uncond = torch.split(guided, len(guided) // 2, dim=0)
        half_out = uncond + cfg_scale * (cond - uncond)
        if guidance_interval is not None:
            t_lo, t_hi = guidance_interval
            t_half = (t.expand(x.shape[0]) if t.ndim == 0 else t)[: len(half)]
            inside = ((t_half >= t_lo) & (t_half <= t_hi)).view(-1, *([1] * (half_out.ndim - 1)))
            half_out = torch.where(inside, half_out, cond)
        return torch.cat([torch.cat([half_out, half_out], dim=0), rest], dim=1)


REFERENCE_CFG_CHANNELS = 3  # the reference SiT / DiT guide channels 0-2 of SD-VAE's 4 latent channels


def default_cfg_channels(in_channels: int) -> int:
    """Channels classifier-free guidance acts on by default: the reference's first 3 for 4-channel latents
    (SD-VAE, the only VAE the reference code knew: parity with its samples), every channel for any other
    model (a 16-channel VAE's latents, pixels), where "3" would be an accident of that code, not a choice.

    >>> default_cfg_channels(4), default_cfg_channels(16), default_cfg_channels(3)
    (3, 16, 3)
    """
    return REFERENCE_CFG_CHANNELS if in_channels == 4 else in_channels


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################


def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim) [sin(pos * w), cos(pos * w)], w_k = 10000^(-k / (embed_dim / 2))."""
    assert embed_dim % 2 == 0
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=pos.device) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]  # (M, D/2), outer product
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, embed_dim) MAE-style 2-D sin-cos embedding for a row-major token grid (float64).

    The first half of the channels encodes the column index, the second half the row index: this
    order is what the released checkpoints were trained with.

    Example: get_2d_sincos_pos_embed(1152, 16).shape == (256, 1152)
    """
    assert embed_dim % 2 == 0
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # token k = row * grid_size + col
    emb_first = get_1d_sincos_pos_embed(embed_dim // 2, cols)
    emb_second = get_1d_sincos_pos_embed(embed_dim // 2, rows)
    return torch.cat([emb_first, emb_second], dim=1)


#################################################################################
#                                   SiT Configs                                 #
#################################################################################

# name -> (depth, hidden_size, num_heads); the patch size comes from the "/p" suffix. The paper's sizes
# S/B/L/XL, plus two tiny ones that are not in the paper: "T" for the CPU demo and "N" for tests.
SIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "T": (4, 64, 4),
    "N": (2, 32, 2),
}


def _make_config(size: str, patch_size: int) -> Callable[..., SiT]:
    depth, hidden_size, num_heads = SIT_SIZES[size]

    def build(**kwargs) -> SiT:
        return SiT(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads, **kwargs)

    build.__name__ = f"SiT_{size}_{patch_size}"
    build.__doc__ = f"SiT-{size}/{patch_size}: depth {depth}, hidden {hidden_size}, {num_heads} heads."
    return build


SiT_models: dict[str, Callable[..., SiT]] = {
    f"SiT-{size}/{p}": _make_config(size, p) for size in ("XL", "L", "B", "S") for p in (2, 4, 8)
}


def create_model(name: str, **kwargs) -> SiT:
    """Builds a SiT by config name ("SiT-XL/2", "SiT-B/4", "SiT-S/8", ...); kwargs go to SiT().

    Example:
        model = create_model("SiT-XL/2", learn_sigma=True)  # 675,129,632 parameters, the released shape
    """
    if name not in SiT_models:
        raise ValueError(f"unknown SiT config {name!r}; choose one of {sorted(SiT_models)}")
    return SiT_models[name](**kwargs)


#################################################################################
#                              Checkpoint Loading                               #
#################################################################################


def _read_state_dict(path_or_state_dict: str | os.PathLike | Mapping[str, object]) -> dict[str, torch.Tensor]:
    if isinstance(path_or_state_dict, Mapping):
        checkpoint = dict(path_or_state_dict)
    else:
        # weights_only keeps loading safe; our training checkpoints also pickle their argparse args.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
    for key in ("ema", "model"):  # training checkpoints: prefer the EMA weights, as sampling does
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = dict(checkpoint[key])
            break
    # Strip wrappers' prefixes (DistributedDataParallel, torch.compile).
    state_dict = {}
    for k, v in checkpoint.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        state_dict[k] = v
    return state_dict


def load_official_checkpoint(model: SiT, path_or_state_dict: str | os.PathLike | Mapping[str, object]) -> SiT:
    """Loads reference SiT weights (file path, raw state dict, or {"ema": ...}/{"model": ...}) into model.

    The released checkpoints have a learn_sigma head with 2*C output channels; when model.learn_sigma is
    False the head is sliced to the C channels forward() uses, so the loaded model gives the same outputs.

    Example:
        model = load_official_checkpoint(create_model("SiT-XL/2"), "SiT-XL-2-256x256.pt")
    """
    state_dict = _read_state_dict(path_or_state_dict)
    w_key, b_key = "final_layer.linear.weight", "final_layer.linear.bias"
    p2 = model.patch_size**2
    want = model.final_layer.linear.out_features
    if w_key in state_dict and state_dict[w_key].shape[0] != want:
        weight, bias = state_dict[w_key], state_dict[b_key]
        c_ckpt = weight.shape[0] // p2
        if weight.shape[0] != p2 * c_ckpt or c_ckpt != 2 * model.out_channels:
            raise ValueError(
                f"checkpoint head has {weight.shape[0]} outputs but the model expects {want} "
                f"(patch {model.patch_size}, {model.out_channels} channels); check the config name "
                "and learn_sigma (the released checkpoints need learn_sigma=True or are sliced from 2*C to C)"
            )
        # Each token's outputs are laid out (p, p, C) with C fastest (see unpatchify): keep the first
        # C/2 channels of every patch position, not simply the first half of the rows.
        c = model.out_channels
        state_dict[w_key] = weight.reshape(p2, c_ckpt, -1)[:, :c].reshape(p2 * c, -1).clone()
        state_dict[b_key] = bias.reshape(p2, c_ckpt)[:, :c].reshape(p2 * c).clone()
    model.load_state_dict(state_dict, strict=True)
    return model
