"""A loss whose step changes every call, inside a compiled function: no new graph per step.

Dynamo specialises Python numbers that reach traced code: an int step is recompiled for once (then made
dynamic), but a float warm-up weight is baked into the graph as a constant on torch < 2.6
(``specialize_float``, emulated here), so every step compiled anew until the recompile limit sent the frame
back to eager, silently. Counted with ``CompileCounter`` (one count per compiled graph).
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch.torch_version import TorchVersion
from toy_models import ToyDiT, make_batch

import anm

STEPS = 10
# Dynamo makes an int that keeps changing dynamic after one recompile (torch 2.13) or three (torch 2.4,
# per frame): by this step every count must have stopped growing.
SETTLED = 4


@pytest.fixture(params=[False, True], ids=["float-dynamic", "float-specialised(torch<2.6)"])
def specialize_float(request):
    if not hasattr(torch._dynamo.config, "specialize_float"):
        pytest.skip(f"torch {torch.__version__} has no specialize_float setting")
    if not request.param and TorchVersion(torch.__version__) < (2, 6):
        pytest.skip("specialize_float=False is not this torch's default (torch < 2.6 specialises floats)")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(specialize_float=request.param):
        yield request.param
    torch._dynamo.reset()


def graphs_per_step(step_fn) -> list[int]:
    counter_after = []
    for step in range(STEPS):
        step_fn(step)
        counter_after.append(step_fn.counter.frame_count)
    return counter_after


def test_regularizer_loss_with_a_changing_step_compiles_no_graph_per_step(specialize_float):
    torch.manual_seed(0)
    model, twin = ToyDiT(depth=2), ToyDiT(depth=2)
    twin.load_state_dict(model.state_dict())
    wrapped, eager = anm.ANM(model, alpha=3.0, warmup=100), anm.ANM(twin, alpha=3.0, warmup=100)
    x, t = make_batch()
    counter = CompileCounter()

    @torch.compile(backend=counter)
    def compiled_step(step):
        return wrapped(x, t).pow(2).mean() + wrapped.loss(step=step)

    def step_fn(step):
        loss = compiled_step(step)
        expected = eager(x, t).pow(2).mean() + eager.loss(step=step)
        torch.testing.assert_close(loss, expected)
        assert wrapped.stats()["anm/weight"] == step / 100 and wrapped.stats()["anm/step"] == step
        assert wrapped.stats()["anm/loss"] == pytest.approx(eager.stats()["anm/loss"])

    step_fn.counter = counter
    counts = graphs_per_step(step_fn)
    # The first changes of the int step make it dynamic (Dynamo's rule for any int); after that no step
    # adds a graph.
    assert counts[SETTLED:] == [counts[SETTLED]] * (STEPS - SETTLED), counts


def test_anm_loss_module_with_a_changing_step_compiles_no_graph_per_step(specialize_float):
    criterion = anm.ANMLoss(alpha=3.0, lam=2.0, warmup=100, warmup_kind="cosine")
    norms = torch.rand(4, 6) * 4
    counter = CompileCounter()
    compiled = torch.compile(criterion, backend=counter, fullgraph=True)

    def step_fn(step):
        torch.testing.assert_close(compiled(norms, step=step), criterion(norms, step=step))

    step_fn.counter = counter
    counts = graphs_per_step(step_fn)
    assert counts[SETTLED:] == [counts[SETTLED]] * (STEPS - SETTLED), counts


def test_anm_loss_takes_a_tensor_weight_inside_one_graph(specialize_float):
    # The way to hand anm_loss a weight that changes per call: a tensor, checked in eager calls only.
    counter = CompileCounter()
    compiled = torch.compile(anm.anm_loss, backend=counter, fullgraph=True)  # fullgraph: no graph break either
    norms = torch.rand(4, 6) * 4
    for step in range(STEPS):
        weight = torch.tensor(anm.warmup_weight(step, 100))
        torch.testing.assert_close(compiled(norms, alpha=3.0, weight=weight), anm.anm_loss(norms, 3.0, weight=weight))
    assert counter.frame_count == 1
