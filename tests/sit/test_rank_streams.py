"""Every rank draws its own CUDA random numbers (label dropout is drawn on the model's device): after the setup of
train.py, and during its steps, each rank's CUDA generator is the one seed_everything seeded with the rank's seed,
as its CPU generator is. Tested on the CPU through tests/sit/fake_cuda_rng.py, which records what seeds the CUDA
generators; before the fix the model initialisation (torch.manual_seed inside fork_rng(devices=[])) reseeded them
with --global-seed on every rank, and every item of a dataset without a generator argument with the item's seed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fake_cuda_rng
import pytest
import torch
import train
from data.datasets import build_dataset
from data.streams import SeededItems, rng_state, seed_everything, set_rng_state
from data.train_data import heldout_item
from ports import free_port
from runtime.distributed import DistContext

SIT_DIR = Path(__file__).resolve().parents[2] / "examples" / "sit"
TESTS_DIR = Path(__file__).resolve().parent
TINY = ["--data", "sinusoid", "--image-size", "8", "--data-size", "48", "--model", "SiT-N/2", "--global-batch-size",
        "8", "--num-workers", "0", "--eval-every", "3", "--eval-samples", "8", "--sample-every", "0", "--no-progress",
        "--no-console-log"]
CPU = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), created=False)


def test_building_the_model_leaves_the_cuda_generators_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_cuda_rng.install(monkeypatch)
    args = train.parse_args([*TINY, "--global-seed", "3"])
    seed_everything(3 * 2 + 1, CPU.device)  # rank 1 of 2
    cpu_state = torch.get_rng_state()
    config = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=1)
    raw = train.build_models(args, config, CPU)[0]
    assert fake.seeds == {0: 7, 1: 7}, fake.calls  # not --global-seed 3
    assert torch.equal(torch.get_rng_state(), cpu_state)  # the CPU stream is forked and restored
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        expected = train.SiT(**config).state_dict()
    assert all(torch.equal(value, raw.state_dict()[key]) for key, value in expected.items())  # as it always was


def test_items_drawn_from_the_global_rng_leave_the_cuda_generators_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """SeededItems seeds torch's RNG per item for a dataset without a generator argument (a random flip); with
    --num-workers 0 that runs in the training process, between its steps. The held-out items too, in the setup."""
    fake = fake_cuda_rng.install(monkeypatch)
    fake.manual_seed_all(11)
    dataset = build_dataset("sinusoid", num_samples=4, image_size=8, seed=0)[0]
    cpu_state = torch.get_rng_state()
    first = SeededItems(dataset, (3, 8, 8))[(2, 12345)]
    heldout_item(dataset, 1, torch.Generator())
    assert fake.seeds == {0: 11, 1: 11}, fake.calls
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert all(torch.equal(a, b) for a, b in zip(first[::2], SeededItems(dataset, (3, 8, 8))[(2, 12345)][::2],
                                                  strict=True))  # the item's draws depend on its seed alone


def test_a_resume_restores_each_ranks_cuda_state_on_its_own_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """What runtime/checkpoints.restore does with the same world size: set_rng_state(checkpoint["rng"][rank])."""
    fake = fake_cuda_rng.install(monkeypatch, devices=2)
    saved = []
    for rank in range(2):
        fake.current = rank
        fake.manual_seed(100 + rank)
        saved.append(rng_state(torch.Generator(), torch.device("cuda", rank)))
    fake.manual_seed_all(0)
    for rank in range(2):
        set_rng_state(saved[rank], torch.Generator(), torch.device("cuda", rank))
    assert fake.seeds == {0: 100, 1: 101}



def test_two_ranks_keep_their_own_cuda_streams_through_setup_and_steps(tmp_path: Path) -> None:
    """torchrun-style launch of 2 gloo ranks, each with fake CUDA generators: after a run of 2 steps (setup,
    held-out set, data stream, model, ANM) each rank's CUDA generator still holds its own seed,
    --global-seed * world size + rank, the seed of its CPU stream."""
    script = (
        "import os, sys; sys.path[:0] = sys.argv[1:3]; import fake_cuda_rng, torch; "
        "fake = fake_cuda_rng.install(current=int(os.environ['LOCAL_RANK'])); import train; "
        "train.main(train.parse_args(sys.argv[4:])); "
        "torch.save(dict(seeds=fake.seeds, calls=fake.calls), "
        "os.path.join(sys.argv[3], 'rank%s.pt' % os.environ['RANK']))"
    )
    argv = [*TINY, "--results-dir", str(tmp_path), "--exp-name", "run", "--max-steps", "2", "--global-seed", "5",
            "--anm", "--anm-alpha", "5"]
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, "-c", script, str(SIT_DIR), str(TESTS_DIR), str(tmp_path),
                                       *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    for rank in range(2):
        record = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert record["seeds"][rank] == 5 * 2 + rank, (rank, record["calls"])
