"""REPA in train.py's loop: λ · the alignment of the hidden state after block k to a frozen DINOv2's patch tokens
of the same images (regularizers/repa.py has the definition), with its trained projector, its checkpoint state
and the encoder's measured time.

    >>> repa_depth(28), repa_depth(24), repa_depth(12), repa_depth(3)
    (8, 8, 4, 1)
"""
from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Iterator

import torch
from data.streams import cpu_seeded
from modeling.fingerprint import weights_sha256
from runtime.cli import UsageError
from runtime.distributed import all_reduce_
from torch import Tensor, nn

import anm
from regularizers.repa import Projector, encoder_resolution, encoder_tokens, load_encoder, repa_loss

__all__ = ["repa_depth", "EncoderTimer", "RepaTerm", "build_repa"]


def repa_depth(depth: int) -> int:
    """The default aligned block (counted from 1) of a model of ``depth`` blocks: REPA's 8 for SiT-L and SiT-XL
    (24 and 28 blocks), else depth // 3 (4 for SiT-S and SiT-B), at least 1."""
    return 8 if depth in (24, 28) else max(1, depth // 3)


class EncoderTimer:
    """The encoder's time and calls, summed until :meth:`pop_ms`. On CUDA it records events and reads them only
    when popped, after the log row's sync: no host sync in the step.

    >>> timer = EncoderTimer(torch.device("cpu"))
    >>> with timer():
    ...     pass
    >>> ms, calls = timer.pop_ms()
    >>> ms >= 0.0, calls
    (True, 1)
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.seconds = 0.0
        self.calls = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self.calls += 1
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
        else:
            began = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - began

    def pop_ms(self) -> tuple[float, int]:
        """(milliseconds spent in the encoder, calls) since the last pop."""
        for _, end in self.events:
            end.synchronize()
        ms = self.seconds * 1000 + sum(start.elapsed_time(end) for start, end in self.events)
        popped = (ms, self.calls)
        self.events, self.seconds, self.calls = [], 0.0, 0
        return popped


class RepaTerm:
    """λ · REPA's loss for the training forwards of ``model``: the hidden state of block ``layer`` (read by an
    :class:`anm.ActivationCollector`), projected by a trained :class:`Projector` to the encoder's width, against
    the encoder's tokens of the images of the same micro-batch.

    Example:
        >>> import transformers  # doctest: +SKIP
        >>> encoder = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=32, patch_size=4)).eval()  # doctest: +SKIP
        >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])  # doctest: +SKIP
        >>> term = RepaTerm(net, "0", encoder, grid=2, width=8, projector_dim=32)  # doctest: +SKIP
        >>> _ = net(torch.randn(2, 4, 8))  # doctest: +SKIP
        >>> term.loss(torch.rand(2, 3, 8, 8) * 2 - 1).shape  # doctest: +SKIP
        torch.Size([])
    """

    def __init__(self, model: nn.Module, layer: str, encoder: nn.Module, grid: int, width: int, lam: float = 0.5,
                 projector_dim: int = 2048, resolution: int | None = None, encoder_path: str = "") -> None:
        self.encoder, self.grid, self.lam, self.resolution = encoder, grid, lam, resolution
        self.encoder_path = encoder_path  # for the messages
        self.collector = anm.ActivationCollector(model, layers=layer, site="output", keep_activations=True,
                                                 training_only=True)
        self.names = self.collector.names
        self.projector = Projector(width, encoder.config.hidden_size, projector_dim)
        self.encoder_sha256 = weights_sha256(encoder)
        self.timer = EncoderTimer(next(encoder.parameters()).device)

    def targets(self, images: Tensor) -> Tensor:
        """The encoder's tokens of ``images`` on the model's grid (no gradient), timed."""
        with self.timer():
            return encoder_tokens(self.encoder, images, self.grid, self.resolution)

    def loss(self, images: Tensor) -> Tensor:
        """λ times REPA's loss of the hidden state recorded by the last training forward, against ``images``."""
        states = self.collector.hidden_states()
        self.collector.clear()
        if len(states) != 1:
            raise RuntimeError(f"REPA: block {self.names} recorded {len(states)} training forwards since the last "
                               "loss(), expected 1 (hooks added after torch.compile traced the model?)")
        return self.lam * repa_loss(states[0], self.targets(images), self.projector)

    def sync_gradients(self, world_size: int) -> None:
        """Average the projector's gradients over the ranks (it is outside the DDP-wrapped model): one
        all-reduce of a flat device tensor."""
        grads = [p.grad for p in self.projector.parameters() if p.grad is not None]
        if world_size == 1 or not grads:
            return
        flat = all_reduce_(torch.cat([g.reshape(-1) for g in grads]))
        flat /= world_size
        for grad, averaged in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(averaged.view_as(grad))

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the projector's weights and the encoder's fingerprint."""
        return dict(projector=self.projector.state_dict(), encoder_sha256=self.encoder_sha256)

    def load_state_dict(self, state: dict) -> None:
        """Restore the projector; a checkpoint aligned to another encoder is refused in one line."""
        if state["encoder_sha256"] != self.encoder_sha256:
            raise UsageError(f"--repa-encoder {self.encoder_path}: its weights differ from the encoder this run was "
                             "trained with (fingerprints differ): resume with that encoder")
        try:
            self.projector.load_state_dict(state["projector"])
        except RuntimeError as error:  # another projector width: the flags' and the checkpoint's disagree
            reason = str(error).strip().splitlines()[-1].strip()
            raise UsageError(f"REPA's projector in the checkpoint does not fit this run's ({reason}): resume with "
                             "the flags it was trained with") from error

    def close(self) -> None:
        """Remove the hooks. Safe to call twice."""
        self.collector.remove()

    def describe(self) -> str:
        """One log line: encoder, input, token grids, block, weight, projector size."""
        config = self.encoder.config
        size = f"{self.resolution} px" if self.resolution else "REPA's 224 px per 256 image pixels"
        return (f"REPA: {config.model_type} ({sum(p.numel() for p in self.encoder.parameters()):,} parameters, "
                f"width {config.hidden_size}, input {size}, tokens resampled to {self.grid}x{self.grid}) aligned "
                f"to the output of block {self.names[0]}, lambda {self.lam:g}, projector "
                f"{sum(p.numel() for p in self.projector.parameters()):,} parameters")


def _check_numbers(args: argparse.Namespace, depth: int) -> int:
    """The aligned block (from 1) of the flags, after the one-line refusals of bad numbers."""
    if not args.repa_encoder:
        raise UsageError("--repa needs --repa-encoder PATH: a local transformers DINOv2 folder (e.g. Dinov2Model"
                         ".from_pretrained('facebook/dinov2-base').save_pretrained(PATH) where a network is)")
    if not args.repa_lambda >= 0 or not math.isfinite(args.repa_lambda):
        raise UsageError(f"--repa-lambda must be a finite number >= 0, got {args.repa_lambda}")
    if args.repa_projector_dim < 1:
        raise UsageError(f"--repa-projector-dim must be >= 1, got {args.repa_projector_dim}")
    k = repa_depth(depth) if args.repa_depth is None else args.repa_depth
    if not 1 <= k <= depth:
        raise UsageError(f"--repa-depth {k}: the model has {depth} blocks (1 to {depth})")
    return k


def _resolution(args: argparse.Namespace, encoder: nn.Module, image_pixels: int) -> int:
    """The encoder's input size: --repa-resolution, or REPA's rule; whole encoder patches either way."""
    patch = encoder.config.patch_size
    size = args.repa_resolution or encoder_resolution(image_pixels, patch)
    if size < patch or size % patch:
        raise UsageError(f"--repa-resolution {size}: not a positive multiple of the encoder's {patch}-pixel "
                         f"patches: use e.g. {max(patch, size // patch * patch)}")
    return size


def build_repa(args: argparse.Namespace, model: nn.Module, width: int, grid: int, image_pixels: int,
               device: torch.device) -> RepaTerm | None:
    """The REPA term of train.py's flags on the bare ``model`` of ``width`` features on a ``grid`` x ``grid`` token
    grid of images of ``image_pixels`` (hooks before DDP / compile), or None without
    --repa. The encoder loads (frozen) from the local --repa-encoder folder, on ``device``; the projector's
    initialisation is the same on every rank."""
    if not args.repa:
        return None
    blocks = [name for name, _ in anm.find_blocks(model)]
    k = _check_numbers(args, len(blocks))
    try:
        import transformers  # noqa: F401 — REPA's encoder is a transformers model
    except ImportError as error:
        raise UsageError("--repa needs the transformers package: pip install 'transformers>=4.48' (or "
                         "'anm-torch[examples]')") from error
    encoder = load_encoder(args.repa_encoder).to(device)
    size = _resolution(args, encoder, image_pixels)
    with cpu_seeded(args.global_seed + 7):  # the projector's initialisation: every rank the same
        term = RepaTerm(model, blocks[k - 1], encoder, grid, width, lam=args.repa_lambda,
                        projector_dim=args.repa_projector_dim, resolution=size, encoder_path=args.repa_encoder)
    term.projector.to(device)
    return term

