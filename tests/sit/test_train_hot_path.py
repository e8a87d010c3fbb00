"""What train.py's steps pay for beyond the model: DDP's gradients are views of its all-reduce buckets (no copy
back), and the DataLoader's workers start once per run, not once per epoch, with the data stream unchanged."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import train
from data import train_data
from modeling.transport import create_transport
from runtime.distributed import DistContext
from runtime.preemption import ignore_stop_signals

CPU = torch.device("cpu")
TINY = ["--data", "sinusoid", "--image-size", "8", "--data-size", "48", "--model", "SiT-N/2", "--global-batch-size",
        "8", "--eval-every", "0", "--sample-every", "0", "--no-console-log", "--no-progress", "--anm", "--anm-alpha",
        "5", "--anm-warmup", "0", "--exp-name", "run"]
WORKER_LOG = "TEST_TRAIN_HOT_PATH_WORKER_STARTS"


@pytest.fixture
def one_rank_group(tmp_path: Path):
    """A gloo process group of this process alone: enough for DDP to build its reducer and all-reduce."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.orders
def test_ddp_gradients_are_views_of_its_buckets_and_the_step_is_unchanged(one_rank_group) -> None:
    """build_models wraps DDP (it does for world size > 1) with gradient_as_bucket_view; two steps of 2 micro-batches
    (no_sync on the first), clipping and zero_grad(set_to_none=True) end at the weights of the same steps without
    DDP, bit for bit (one rank: the all-reduce changes nothing)."""
    args = train.parse_args([*TINY, "--grad-accum-steps", "2", "--max-grad-norm", "1e-2", "--class-dropout-prob", "0"])
    config = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=1,
                  class_dropout_prob=0.0)
    wrapped = train.build_models(args, config, DistContext(0, 0, 2, CPU, False))
    plain = train.build_models(args, config, DistContext(0, 0, 1, CPU, False))
    ddp = wrapped[4]
    assert ddp is not None and plain[4] is None and ddp.gradient_as_bucket_view
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 8, 8, generator=gen)
    batch = (x, torch.zeros(8, dtype=torch.long), torch.randn(8, 3, 8, 8, generator=gen), torch.rand(8, generator=gen),
             x)  # the images REPA would see
    transport, autocast = create_transport(), dict(device_type="cpu", dtype=torch.bfloat16, enabled=False)
    for step in range(2):
        for raw, _, anm_model, model, ddp_or_none, opt, terms in (wrapped, plain):
            opt.zero_grad(set_to_none=True)
            train.forward_backward(model, ddp_or_none, anm_model, transport, batch, step, torch.zeros(5), autocast,
                                   args, terms)
            torch.nn.utils.clip_grad_norm_(raw.parameters(), args.max_grad_norm)
            opt.step()
    grads = [p.grad for p in wrapped[0].parameters() if p.requires_grad]
    assert len({g.untyped_storage().data_ptr() for g in grads}) < len(grads)  # views into a few flat buckets
    for (key, a), b in zip(wrapped[0].state_dict().items(), plain[0].state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    for module in (wrapped[2], plain[2]):
        module.close()


def record_worker_start(worker_id: int = 0) -> None:
    """The loader's worker_init_fn, which also appends this worker's pid to the file named in WORKER_LOG."""
    ignore_stop_signals(worker_id)
    with open(os.environ[WORKER_LOG], "a") as f:
        f.write(f"{os.getpid()}\n")


def test_workers_start_once_per_run_and_the_stream_is_the_one_without_workers(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """6 steps per epoch: 3 steps, then a resume to step 8 (the rest of epoch 0 and 2 steps of epoch 1) with one
    worker start per run, not per epoch; the weights end where 8 steps without workers end."""
    starts = tmp_path / "starts"
    monkeypatch.setenv(WORKER_LOG, str(starts))
    monkeypatch.setattr(train_data, "ignore_stop_signals", record_worker_start)
    workers = [*TINY, "--num-workers", "1", "--results-dir", str(tmp_path / "workers")]
    train.main(train.parse_args([*workers, "--max-steps", "3"]))
    assert len(starts.read_text().split()) == 1
    resumed = train.main(train.parse_args([*workers, "--max-steps", "8", "--resume", "auto"]))
    assert len(starts.read_text().split()) == 2, "a worker start per epoch"
    straight = train.main(train.parse_args([*TINY, "--num-workers", "0", "--max-steps", "8", "--results-dir",
                                            str(tmp_path / "straight")]))
    ck_a, ck_b = (torch.load(out["checkpoint"], weights_only=True) for out in (straight, resumed))
    for part in ("model", "ema"):
        for key, value in ck_a[part].items():
            assert torch.equal(value, ck_b[part][key]), f"{part}.{key}"
    assert (ck_b["epoch"], ck_b["epoch_step"]) == (1, 2)
