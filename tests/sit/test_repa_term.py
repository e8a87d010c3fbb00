"""REPA in the loop: the term against an independent computation of its definition (value and gradients, also on
2 gloo ranks), and train.py with --repa (the log columns, the images the encoder sees, exact resume with every
term on, the projector kept out of what sample.py loads, one-line refusals)."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import train
from dinov2s import tiny_dinov2
from numerics import assert_same_adam_training
from ports import free_port
from regularizers.repa_term import RepaTerm
from runtime.cli import UsageError
from test_train import assert_same_tree, read_csv, tiny_args
from torch import nn

transformers = pytest.importorskip("transformers")
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def tiny_encoder(seed: int = 0) -> nn.Module:
    """A random 1-layer DINOv2 with 4-pixel patches and one register token."""
    return tiny_dinov2(seed, registers=1, hidden_size=12, image_size=16)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dinov2")
    tiny_encoder().save_pretrained(path)
    return str(path)


def reference_loss(hidden: torch.Tensor, images: torch.Tensor, encoder: nn.Module, projector: nn.Module,
                   lam: float, size: int, grid: int) -> torch.Tensor:
    """λ · mean over samples and tokens of −z·y / (|z| |y|), in float64 loops, with the encoder's patch tokens of
    the images preprocessed as REPA's code does and averaged over 2x2 token blocks to the model's grid."""
    x = (((images + 1) / 2) - MEAN) / STD
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    tokens = encoder(pixel_values=x).last_hidden_state[:, 2:].double()  # class and register tokens dropped
    side = size // 4
    maps = tokens.view(len(tokens), side, side, -1)
    step = side // grid
    targets = torch.stack([maps[:, i:i + step, j:j + step].mean((1, 2)) for i in range(0, side, step)
                           for j in range(0, side, step)], 1)
    total = hidden.new_zeros((), dtype=torch.float64)
    for n in range(hidden.shape[0]):
        for t in range(hidden.shape[1]):
            z = projector(hidden[n, t]).double()
            y = targets[n, t]
            total = total - (z @ y) / (z.norm() * y.norm())
    return lam * total / (hidden.shape[0] * hidden.shape[1])


def blocks() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(3)])


@pytest.mark.parametrize("layer", ["0", "1"])
def test_the_term_matches_its_definition_in_value_and_gradient(layer: str) -> None:
    net, encoder = blocks(), tiny_encoder()
    term = RepaTerm(net, layer, encoder, grid=2, width=6, lam=0.5, projector_dim=8, resolution=16)
    tokens_in = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(2))  # 3 samples, a 2x2 token grid
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    net(tokens_in)  # the training forward, whose hooks record the block's output
    got = term.loss(images)
    params = [*net.parameters(), *term.projector.parameters()]
    got_grads = torch.autograd.grad(got, params, allow_unused=True)
    hidden = net[: int(layer) + 1](tokens_in)  # the block's output, without hooks
    want = reference_loss(hidden, images, encoder, term.projector, 0.5, size=16, grid=2)
    want_grads = torch.autograd.grad(want, params, allow_unused=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert (g is None) == (w is None)  # blocks after the aligned one get no gradient from the term
        if g is not None:
            torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-7)
    term.close()
    assert not any(block._forward_hooks for block in net)


def test_a_forward_without_training_records_nothing_and_two_forwards_are_refused() -> None:
    net = blocks()
    term = RepaTerm(net, "1", tiny_encoder(), grid=2, width=6, projector_dim=8, resolution=16)
    with torch.no_grad():
        net(torch.randn(2, 4, 6))
    with pytest.raises(RuntimeError, match="recorded 0 training forwards"):
        term.loss(torch.zeros(2, 3, 8, 8))
    net(torch.randn(2, 4, 6))
    net(torch.randn(2, 4, 6))
    with pytest.raises(RuntimeError, match="recorded 2 training forwards"):
        term.loss(torch.zeros(2, 3, 8, 8))


def _rank(rank: int, port: int, out: str) -> None:
    # A rank that never joins fails the test in a minute instead of hanging it.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    net = blocks()
    term = RepaTerm(net, "1", tiny_encoder(), grid=2, width=6, lam=0.5, projector_dim=8, resolution=16)
    model = nn.parallel.DistributedDataParallel(net)
    x = torch.randn(8, 4, 6, generator=torch.Generator().manual_seed(7))  # the global batch; each rank a half
    images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(8)) * 2 - 1
    prediction = model(x.chunk(2)[rank])
    loss = term.loss(images.chunk(2)[rank])
    (loss + 0 * prediction.sum()).backward()  # DDP averages the model's gradients
    term.sync_gradients(2)  # the projector's, outside DDP
    grads = {"block": net[1][0].weight.grad, **{f"projector.{k}": p.grad for k, p in
                                                 term.projector.named_parameters()}}
    torch.save(dict(loss=loss.detach(), grads=grads), os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()  # every collective done, and DDP's reducer gone, before the group is torn down
    del model
    dist.destroy_process_group()


def test_under_ddp_the_gradients_are_the_global_batch_s(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    net, encoder = blocks(), tiny_encoder()
    term = RepaTerm(net, "1", encoder, grid=2, width=6, lam=0.5, projector_dim=8, resolution=16)
    term.close()
    x = torch.randn(8, 4, 6, generator=torch.Generator().manual_seed(7))
    images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(8)) * 2 - 1
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for rank, (shard, shard_images) in enumerate(zip(x.chunk(2), images.chunk(2), strict=True)):
        want = reference_loss(net[:2](shard), shard_images, encoder, term.projector, 0.5, 16, 2)
        torch.testing.assert_close(ranks[rank]["loss"].double(), want.detach(), rtol=1e-5, atol=1e-7)
    whole = reference_loss(net[:2](x), images, encoder, term.projector, 0.5, 16, 2)  # equal shares: the mean
    params = {"block": net[1][0].weight, **{f"projector.{k}": p for k, p in term.projector.named_parameters()}}
    want = dict(zip(params, torch.autograd.grad(whole, list(params.values())), strict=True))
    for name, grad in want.items():
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
        torch.testing.assert_close(ranks[0]["grads"][name].double(), grad.double(), rtol=1e-4, atol=1e-7)


def repa_flags(encoder: str) -> tuple[str, ...]:
    return ("--repa", "--repa-encoder", encoder, "--repa-depth", "1", "--repa-projector-dim", "16",
            "--repa-resolution", "8")


def test_training_logs_the_terms_and_feeds_the_encoder_the_batch_images(tmp_path: Path, encoder_dir: str,
                                                                        monkeypatch) -> None:
    seen: dict[str, list[torch.Tensor]] = {"model": [], "encoder": []}
    targets, training_losses = RepaTerm.targets, train.Transport.training_losses

    def record_targets(self, images):
        seen["encoder"].append(images.clone())
        return targets(self, images)

    def record_data(self, model, x1, *args, **kwargs):
        if model.training:  # not the held-out evaluation's
            seen["model"].append(x1.clone())  # the clean images the FM loss trains on (pixel data)
        return training_losses(self, model, x1, *args, **kwargs)

    monkeypatch.setattr(RepaTerm, "targets", record_targets)
    monkeypatch.setattr(train.Transport, "training_losses", record_data)
    out = train.main(tiny_args(tmp_path, "--max-steps", "2", "--grad-accum-steps", "2", "--anm", "--dispersive",
                               *repa_flags(encoder_dir)))
    assert len(seen["encoder"]) == 4 and all(torch.equal(a, b) for a, b in zip(*seen.values(), strict=True))
    fields, rows = read_csv(Path(out["log_csv"]))
    assert {"repa_loss", "repa_encoder_ms", "dispersive_loss"} <= set(fields)
    last = rows[-1]
    assert -0.5 <= float(last["repa_loss"]) <= 0.5 and float(last["repa_encoder_ms"]) > 0
    assert float(last["loss"]) == pytest.approx(sum(float(last[k]) for k in ("fm_loss", "anm_loss",
                                                                              "dispersive_loss", "repa_loss")))
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "REPA: dinov2_with_registers" in log and "repa loss" in log and "REPA's encoder" in log
    assert all(not block._forward_hooks for block in out["model"].blocks)  # the returned SiT is bare
    checkpoint = torch.load(out["checkpoint"], weights_only=True)
    assert set(checkpoint["terms"]["repa"]) == {"projector", "encoder_sha256"}
    assert not any(key.startswith("projector") for key in checkpoint["model"])  # sample.py loads "model"/"ema"


def test_resume_is_bit_exact_with_every_term_on(tmp_path: Path, encoder_dir: str) -> None:
    flags = ("--anm", "--anm-alpha", "5", "--anm-warmup", "4", "--dispersive", *repa_flags(encoder_dir),
             "--max-grad-norm", "1.0")
    straight = train.main(tiny_args(tmp_path / "a", "--max-steps", "6", *flags))
    train.main(tiny_args(tmp_path / "b", "--max-steps", "3", *flags))
    resumed = train.main(tiny_args(tmp_path / "b", "--max-steps", "6", "--resume", "auto"))
    ck_a, ck_b = (torch.load(out["checkpoint"], weights_only=True) for out in (straight, resumed))
    for key in ("model", "ema", "opt", "rng", "anm", "step", "terms"):
        assert_same_tree(ck_a[key], ck_b[key], key)
    trained = sum(p.requires_grad for p in straight["model"].parameters())
    assert len(ck_a["opt"]["state"]) == trained + 6  # + the projector's 3 weights and 3 biases
    _, rows_a = read_csv(Path(straight["log_csv"]))
    _, rows_b = read_csv(Path(resumed["log_csv"]))
    assert rows_a[-1]["repa_loss"] == rows_b[-1]["repa_loss"] != ""


def test_a_resume_with_another_encoder_is_refused_before_anything_is_written(tmp_path: Path,
                                                                             encoder_dir: str) -> None:
    train.main(tiny_args(tmp_path, "--max-steps", "2", *repa_flags(encoder_dir)))
    other = tmp_path / "other"
    tiny_encoder(seed=5).save_pretrained(other)
    log = (tmp_path / "run" / "log.txt").read_text()
    with pytest.raises(UsageError, match="weights differ from the encoder this run was trained with") as error:
        train.main(tiny_args(tmp_path, "--max-steps", "3", "--resume", "auto", "--repa-encoder", str(other)))
    assert "\n" not in str(error.value)
    assert (tmp_path / "run" / "log.txt").read_text() == log


@pytest.mark.parametrize("flags, message", [
    (("--repa",), "--repa needs --repa-encoder PATH"),
    (("--repa", "--repa-encoder", "ENC", "--repa-depth", "3"), "--repa-depth 3: the model has 2 blocks"),
    (("--repa", "--repa-encoder", "ENC", "--repa-lambda", "-1"), "--repa-lambda must be a finite number >= 0"),
    (("--repa", "--repa-encoder", "ENC", "--repa-projector-dim", "0"), "--repa-projector-dim must be >= 1"),
    (("--repa", "--repa-encoder", "ENC", "--repa-resolution", "10"), "--repa-resolution 10: not a positive"),
    (("--repa", "--repa-encoder", "/nowhere"), "--repa-encoder /nowhere: no transformers model folder"),
    (("--repa-lambda", "1"), "--repa-lambda (REPA is off: add --repa) would be ignored"),
    (("--repa", "--repa-encoder", "ENC", "--repa-image-path", "/x"), "--repa-image-path (--data sinusoid has"),
])
def test_refusals_are_one_line_and_create_nothing(tmp_path: Path, encoder_dir: str, flags: tuple[str, ...],
                                                  message: str) -> None:
    flags = tuple(encoder_dir if flag == "ENC" else flag for flag in flags)
    with pytest.raises(UsageError) as error:
        train.main(tiny_args(tmp_path, "--max-steps", "1", *flags))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_sample_py_loads_a_repa_checkpoint_without_the_projector(tmp_path: Path, encoder_dir: str) -> None:
    from modeling.loading import load_model

    out = train.main(tiny_args(tmp_path, "--max-steps", "1", *repa_flags(encoder_dir)))
    model, _ = load_model(out["checkpoint"], torch.device("cpu"))
    assert_same_tree(model.state_dict(), out["ema"].state_dict(), "ema")


@pytest.mark.orders
@pytest.mark.slow  # inductor compiles the tiny SiT's forward and backward
def test_compiled_training_matches_eager_with_every_term_on(tmp_path: Path, encoder_dir: str) -> None:
    flags = ("--max-steps", "3", "--anm", "--anm-alpha", "5", "--dispersive", *repa_flags(encoder_dir))
    eager = train.main(tiny_args(tmp_path / "eager", *flags))
    compiled = train.main(tiny_args(tmp_path / "compiled", "--compile", *flags))
    _, eager_rows = read_csv(Path(eager["log_csv"]))
    _, compiled_rows = read_csv(Path(compiled["log_csv"]))
    for a, b in zip(eager_rows, compiled_rows, strict=True):
        for key in ("loss", "anm_loss", "dispersive_loss", "repa_loss", "heldout_fm_loss"):
            if a[key] != "":
                assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-6), (a["step"], key)


SIT_DIR = Path(__file__).resolve().parents[2] / "examples" / "sit"


@pytest.mark.orders
def test_two_gloo_ranks_train_as_one_process_with_repa_and_anm(tmp_path: Path, encoder_dir: str) -> None:
    """train.py --repa --anm on 2 gloo ranks (each half of every batch, the projector's gradients averaged by hand)
    ends at one process's weights, projector included, to float32 rounding."""
    flags = ["--class-dropout-prob", "0", "--max-steps", "3", "--anm", "--anm-alpha", "5", *repa_flags(encoder_dir)]
    one = train.main(tiny_args(tmp_path / "one", *flags))
    script = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2], sys.argv[2] + '/..']; import train; "
              "from test_train import tiny_args; from pathlib import Path; "
              "train.main(tiny_args(Path(sys.argv[3]), *sys.argv[4:]))")
    port, procs = free_port(), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", script, str(SIT_DIR), str(Path(__file__).parent),
                                       str(tmp_path / "two"), *flags], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    a = torch.load(one["checkpoint"], weights_only=True)
    b = torch.load(tmp_path / "two" / "run" / "checkpoints" / "0000003.pt", weights_only=True)
    assert_same_adam_training(b["model"], a["model"], lr=1e-4, steps=3)
    assert_same_adam_training(b["terms"]["repa"]["projector"], a["terms"]["repa"]["projector"], lr=1e-4, steps=3)
    assert b["terms"]["repa"]["projector"]["4.bias"].abs().sum() > 0  # trained: REPA initialises biases at zero


def test_the_encoder_timer_reads_cuda_events_only_when_popped(monkeypatch) -> None:
    """On CUDA the encoder's time comes from events read at the log row: no host sync in the step."""
    from regularizers.repa_term import EncoderTimer

    calls: list[str] = []

    class FakeEvent:
        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing

        def record(self) -> None:
            calls.append("record")

        def synchronize(self) -> None:
            calls.append("synchronize")

        def elapsed_time(self, end: FakeEvent) -> float:
            return 2.5

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    timer = EncoderTimer(torch.device("cuda"))
    for _ in range(2):
        with timer():
            pass
    assert calls == ["record"] * 4  # two (start, end) pairs, nothing waited for
    assert timer.pop_ms() == (5.0, 2) and calls.count("synchronize") == 2
    assert timer.pop_ms() == (0.0, 0)
