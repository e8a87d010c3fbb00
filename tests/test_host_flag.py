"""The deferred non-finite check on CUDA, with the model on another GPU than the current one.

No GPU here: ``fake_cuda.FakeCuda`` stands in for ``torch.cuda`` and keeps its ordering rules (a copy runs
on the stream of the CUDA tensor's device; an event waits only for its own stream). With the event on the
wrong stream, the host reads the pinned buffer before the copy wrote it, and a NaN step passes unnoticed.
"""

import pytest
import torch
from fake_cuda import FakeCuda, FakeCudaTensor
from toy_models import ToyDiT, make_batch

import anm

CUDA1 = torch.device("cuda", 1)


def nan_model():
    model = anm.ANM(ToyDiT(depth=3), alpha=3.0, warmup=0)
    with torch.no_grad():
        model.blocks[1].proj.bias.fill_(float("nan"))
    return model


def test_a_nan_step_on_cuda1_is_caught_while_cuda0_is_current(monkeypatch):
    cuda = FakeCuda(current_device=0)
    cuda.install(monkeypatch, flags_on=CUDA1)
    model = nan_model()
    model(*make_batch())
    model.loss(step=4)  # queued: no error yet, no sync
    assert cuda.copies == [1] and cuda.records == [1]  # the event waits on the stream that runs the copy
    assert cuda.contexts == {1}  # the pinned buffer was made under cuda:1: no context on cuda:0
    with pytest.raises(anm.ANMError, match=r"at step 4 in layer\(s\) \['blocks.1'"):
        model.stats()


def test_finite_steps_reuse_one_pinned_buffer_and_never_raise(monkeypatch):
    cuda = FakeCuda(current_device=0)
    cuda.install(monkeypatch, flags_on=CUDA1)
    model = anm.ANM(ToyDiT(depth=2), alpha=3.0, warmup=0)
    for _ in range(3):
        model(*make_batch())
        model.loss()
    assert model.stats()["anm/loss"] >= 0
    assert len(cuda.pinned) == 1 and cuda.copies == [1, 1, 1] and cuda.records == [1, 1, 1]


def test_host_flag_reads_after_its_own_copy_only(monkeypatch):
    from anm.host_flag import HostFlag

    cuda = FakeCuda(current_device=0)
    cuda.install(monkeypatch, flags_on=CUDA1)
    flag = HostFlag(CUDA1)
    flag.copy_from(FakeCudaTensor(torch.tensor(False), CUDA1))
    cuda.current_stream(0).queue.append(lambda: pytest.fail("work of another device was waited for"))
    assert flag.pending and flag.read() is False and not flag.pending
    flag.copy_from(FakeCudaTensor(torch.tensor(True), CUDA1))
    flag.copy_from(FakeCudaTensor(torch.tensor(False), CUDA1))  # the first copy has run before the buffer is reused
    assert flag.read() is False and len(cuda.pinned) == 1


def test_a_copy_of_the_model_drops_the_pending_flag(monkeypatch):
    import copy

    cuda = FakeCuda(current_device=0)
    cuda.install(monkeypatch, flags_on=CUDA1)
    model = anm.ANM(ToyDiT(depth=2), alpha=3.0, warmup=0)
    model(*make_batch())
    model.loss()
    twin = copy.deepcopy(model)  # CUDA events cannot be copied; the copy has no step of its own yet
    assert twin.regularizer._host_flag is None and twin.stats() == {}
