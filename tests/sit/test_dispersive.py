"""Dispersive Loss: the term against its definition (values, gradients, 2 gloo ranks), and train.py with
--dispersive (the log column, exact resume, one-line refusals)."""
from __future__ import annotations

import datetime
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import train
from ports import free_port
from regularizers.dispersive import DispersiveTerm, dispersive_loss
from runtime.cli import UsageError
from test_train import assert_same_tree, read_csv, tiny_args
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def reference(z: torch.Tensor, tau: float, distance: str) -> torch.Tensor:
    """L_disp in float64 with explicit loops over the N² ordered pairs, as the paper writes it."""
    flat = z.reshape(len(z), -1).double()
    n, d = flat.shape
    total = flat.new_zeros(())
    for i in range(n):
        for j in range(n):
            if distance == "l2":
                dist_ij = sum((flat[i, k] - flat[j, k]) ** 2 for k in range(d)) / d
            else:
                dist_ij = -(flat[i] @ flat[j]) / (flat[i].norm() * flat[j].norm())
            total = total + torch.exp(-dist_ij / tau)
    return torch.log(total / n**2)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_the_term_matches_its_definition_in_value_and_gradient(distance: str, tau: float) -> None:
    z = torch.randn(5, 3, 2, generator=torch.Generator().manual_seed(0))  # 5 samples of 3 tokens x 2 features
    z64 = z.double().requires_grad_()
    want = reference(z64, tau, distance)
    (want_grad,) = torch.autograd.grad(want, z64)
    z32 = z.clone().requires_grad_()
    got = dispersive_loss(z32, tau, distance)
    got.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z32.grad.double(), want_grad, rtol=1e-4, atol=1e-6)


def test_the_term_is_computed_in_fp32_from_bf16_states() -> None:
    z = torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = dispersive_loss(z)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(z.float(), 0.5, "l2"), rtol=1e-5, atol=1e-6)
    assert -math.log(6) <= got.item() <= 0


def _blocks() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3)])


def _rank(rank: int, port: int, out: str) -> None:
    # A rank that never joins fails the test in a minute instead of hanging it.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    net = _blocks()
    term = DispersiveTerm(net, layers="1", lam=0.5, tau=0.5)
    model = DDP(net)
    x = torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(7))  # the global batch; each rank a half
    shard = x.chunk(2)[rank]
    prediction = model(shard)
    loss = term.loss()
    (loss + 0 * prediction.sum()).backward()  # every parameter in the graph, as with the FM loss; DDP averages
    torch.save(dict(loss=loss.detach(), grad=net[1][0].weight.grad), os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()  # every collective done, and DDP's reducer gone, before the group is torn down
    del model
    dist.destroy_process_group()


def test_under_ddp_each_rank_repels_within_its_own_shard(tmp_path: Path) -> None:
    port = free_port()
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2)
    net = _blocks()
    x = torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(7))
    grads = []
    for rank, shard in enumerate(x.chunk(2)):
        hidden = net[1](net[0](shard))  # the middle block's output, computed without hooks
        want = 0.5 * reference(hidden, 0.5, "l2")
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"].double(), want.detach(), rtol=1e-5, atol=1e-6)
        grads.append(torch.autograd.grad(want, net[1][0].weight)[0])
        assert torch.equal(got["grad"], torch.load(tmp_path / "rank0.pt", weights_only=True)["grad"])
    torch.testing.assert_close(got["grad"].double(), (grads[0] + grads[1]).double() / 2, rtol=1e-4, atol=1e-6)


DISPERSIVE = ("--dispersive", "--anm", "--anm-alpha", "5", "--anm-warmup", "4")


def test_training_logs_the_term_and_resumes_bit_exactly(tmp_path: Path) -> None:
    straight = train.main(tiny_args(tmp_path / "a", "--max-steps", "6", *DISPERSIVE))
    fields, rows = read_csv(Path(straight["log_csv"]))
    assert "dispersive_loss" in fields
    last = rows[-1]
    assert -math.log(8) * 0.5 <= float(last["dispersive_loss"]) < 0  # lambda * L_disp over a batch of 8
    assert float(last["loss"]) == pytest.approx(float(last["fm_loss"]) + float(last["anm_loss"])
                                                + float(last["dispersive_loss"]))
    assert "dispersive loss" in (tmp_path / "a" / "run" / "log.txt").read_text()
    assert all(not block._forward_hooks for block in straight["model"].blocks)  # the returned SiT is bare

    train.main(tiny_args(tmp_path / "b", "--max-steps", "3", *DISPERSIVE))
    resumed = train.main(tiny_args(tmp_path / "b", "--max-steps", "6", "--resume", "auto"))  # flags from the ckpt
    ck_a = torch.load(straight["checkpoint"], weights_only=True)
    ck_b = torch.load(resumed["checkpoint"], weights_only=True)
    for key in ("model", "ema", "opt", "rng", "anm", "step"):
        assert_same_tree(ck_a[key], ck_b[key], key)
    assert torch.equal(ck_a["log_state"]["running"], ck_b["log_state"]["running"])
    _, resumed_rows = read_csv(Path(resumed["log_csv"]))
    # Step 6's row covers steps 5-6 in both runs (the first stretch of b logged its last step, 3, early).
    assert resumed_rows[-1]["dispersive_loss"] == rows[-1]["dispersive_loss"] != ""


def test_accumulation_and_bf16_run_the_term_per_micro_batch(tmp_path: Path) -> None:
    out = train.main(tiny_args(tmp_path, "--max-steps", "2", "--dispersive", "--grad-accum-steps", "2",
                               "--precision", "bf16", "--dispersive-block", "-1"))
    _, rows = read_csv(Path(out["log_csv"]))
    assert -0.5 * math.log(4) <= float(rows[-1]["dispersive_loss"]) < 0  # micro-batches of 4


@pytest.mark.parametrize("flags, message", [
    (("--dispersive", "--dispersive-block", "2"), "--dispersive-block 2: the model has 2 blocks"),
    (("--dispersive", "--dispersive-block", "head.*"), "--dispersive-block head.*: layers='head.*' matched no"),
    (("--dispersive", "--dispersive-tau", "0"), "--dispersive-tau must be a finite number > 0"),
    (("--dispersive", "--dispersive-lambda", "-1"), "--dispersive-lambda must be a finite number >= 0"),
    (("--dispersive-tau", "1"), "--dispersive-tau (Dispersive Loss is off: add --dispersive) would be ignored"),
])
def test_refusals_are_one_line_and_create_nothing(tmp_path: Path, flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(UsageError) as error:
        train.main(tiny_args(tmp_path, "--max-steps", "1", *flags))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()
