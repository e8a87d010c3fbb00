"""A NaN in one block of a training SiT: does ANM stop the run at the right place, without a host sync per step?

ANM is attached to a SiT (the example's model), which trains a few steps with AdamW (bf16 autocast on CUDA). At
step ``bad_step`` a forward hook, registered before ANM's, turns block ``bad_block``'s output into NaN, as a
diverging layer would. On CUDA the finite check is queued without a sync (anm/host_flag.py) and read by the
next ``loss()``, which must raise an ANMError naming that block and step. Every step up to and including the
bad one runs with ``torch.cuda.set_sync_debug_mode("error")``: the synchronising calls PyTorch flags there (a
blocking copy to the host such as ``.item()``, a stream or device synchronize) raise instead. Waiting on a CUDA
event is not among them: ANM's own wait (anm/host_flag.py, on the previous step's flag, long done) passes.
On the CPU the check is immediate: the error comes at the bad step's own ``loss()``.

    >>> import torch
    >>> from nan_check import check_nan_is_named
    >>> result = check_nan_is_named(torch.device("cpu"), "SiT-N/2", image_size=8)
    >>> result["ok"], result["raised_at_step"], result["names_block"], result["names_step"]
    (True, 3, True, True)
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "sit"))
from modeling.alpha_scaling import matched_alpha  # noqa: E402
from modeling.model_config import parse_model_name  # noqa: E402
from modeling.models import SIT_SIZES, SiT  # noqa: E402

import anm  # noqa: E402

__all__ = ["check_nan_is_named"]


def build_sit(model: str, image_size: int, device: torch.device) -> SiT:
    size, patch = parse_model_name(model)
    depth, hidden, heads = SIT_SIZES[size]
    return SiT(input_size=image_size, patch_size=patch, in_channels=3, hidden_size=hidden, depth=depth,
               num_heads=heads, num_classes=10).to(device)


def poison(step: list[int], bad_step: int):
    """A forward hook that returns the block's output as NaN while ``step[0] == bad_step``."""
    def hook(module, inputs, output):
        return output * float("nan") if step[0] == bad_step else None
    return hook


def check_nan_is_named(device: torch.device, model: str = "SiT-S/2", image_size: int = 32, batch: int = 8,
                       bad_block: int = 1, bad_step: int = 3, steps: int = 6) -> dict:
    """Train ``steps`` steps with a NaN put into ``blocks[bad_block]`` at ``bad_step``; returns ``ok`` and what
    happened: the step whose ``loss()`` raised, the message, whether it names the block and the step, and
    any other error a step raised (on CUDA, the sync debug mode's when a step synced with the host)."""
    # The caller's random streams stay where they were (a test process goes on drawing from them).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        return _train_with_a_nan(device, model, image_size, batch, bad_block, bad_step, steps)


def _train_with_a_nan(device: torch.device, model: str, image_size: int, batch: int, bad_block: int, bad_step: int,
                      steps: int) -> dict:
    sit = build_sit(model, image_size, device)
    step = [0]
    sit.blocks[bad_block].register_forward_hook(poison(step, bad_step))  # before ANM's hooks: ANM sees the NaN
    reg = anm.attach(sit, alpha=matched_alpha(70.0, SIT_SIZES[parse_model_name(model)[0]][1]), warmup=0)
    opt = torch.optim.AdamW(sit.parameters(), lr=1e-4)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    t, y = torch.rand(batch, device=device), torch.randint(0, 10, (batch,), device=device)
    raised_at, message, other_error = None, "", None
    for step[0] in range(steps):
        if cuda:  # strict up to the bad step; the raising call may sync (it reads which layers failed)
            torch.cuda.set_sync_debug_mode("error" if step[0] <= bad_step else "default")
        try:
            with autocast:
                loss = (sit(x, t, y) - x).pow(2).mean() + reg.loss(step=step[0])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        except anm.ANMError as error:
            raised_at, message = step[0], str(error)
            break
        except RuntimeError as error:  # the sync debug mode's (a step synced with the host), or another failure
            other_error = f"step {step[0]}: {str(error).strip().splitlines()[-1][:300]}"
            break
    if cuda:
        torch.cuda.set_sync_debug_mode("default")
    reg.detach()
    expected = bad_step + 1 if cuda else bad_step
    names_block = f"'blocks.{bad_block}'" in message
    names_step = f"at step {bad_step} " in message
    names_earlier = any(f"'blocks.{i}'" in message for i in range(bad_block))  # those were finite
    return dict(ok=raised_at == expected and names_block and names_step and not names_earlier and other_error is None,
                device=str(device), bad_block=bad_block, bad_step=bad_step, raised_at_step=raised_at,
                expected_step=expected, names_block=names_block, names_step=names_step, message=message[:400],
                error=other_error)
