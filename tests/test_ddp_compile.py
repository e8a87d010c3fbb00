"""DDP + torch.compile on torch < 2.6: no higher-order op from ANM in the graph DDPOptimizer splits.

DDPOptimizer of torch < 2.6 raises on any higher-order op, and Dynamo traces the update-site norm's
autograd.Function as one. This torch has a DDPOptimizer that accepts them, and the test runs in one
process without a process group: it fakes the torch version and the DDP forward that is running, and
checks the traced graph the way that DDPOptimizer did (a GraphModule held by a get_attr node). What this
cannot run: torch 2.4 / 2.5 with a real process group and their DDPOptimizer.
"""

import warnings

import pytest
import torch
from torch.torch_version import TorchVersion
from toy_models import ToyDiT, make_batch

import anm
from anm import ddp_compile


def has_higher_order_op(gm: torch.fx.GraphModule) -> bool:
    # torch < 2.6's DDPOptimizer test, reproduced: any submodule graph fetched by get_attr.
    return any(node.op == "get_attr" and isinstance(getattr(gm, node.target), torch.fx.GraphModule)
               for node in gm.graph.nodes)


def compiled_graphs(version: str, inside_ddp: bool, monkeypatch, optimize_ddp=True):
    torch._dynamo.reset()
    monkeypatch.setattr(ddp_compile, "TORCH_VERSION", TorchVersion(version))
    monkeypatch.setattr(ddp_compile, "_warned", False)
    # Only ANM's check sees the fake DDP module: Dynamo's own DDP handling would look for a real one.
    monkeypatch.setattr(ddp_compile, "_active_ddp_module", lambda: object() if inside_ddp else None)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    base, twin = ToyDiT(depth=2), ToyDiT(depth=2)
    twin.load_state_dict(base.state_dict())
    wrapped, eager = anm.ANM(base, alpha=3.0, warmup=0), anm.ANM(twin, alpha=3.0, warmup=0)
    x, t = make_batch()
    with torch._dynamo.config.patch(optimize_ddp=optimize_ddp), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = torch.compile(wrapped, backend=backend)(x, t).pow(2).mean() + wrapped.loss()
    loss.backward()
    (eager(x, t).pow(2).mean() + eager.loss()).backward()
    for (name, p), q in zip(base.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    torch._dynamo.reset()
    return graphs, [str(w.message) for w in caught if "DDPOptimizer" in str(w.message)]


def test_torch_before_2_6_inside_ddp_traces_no_higher_order_op_and_says_how_to_keep_the_lean_norm(monkeypatch):
    graphs, messages = compiled_graphs("2.5.1", inside_ddp=True, monkeypatch=monkeypatch)
    assert graphs and not any(has_higher_order_op(gm) for gm in graphs)
    assert len(messages) == 1 and "torch._dynamo.config.optimize_ddp = False" in messages[0]


@pytest.mark.parametrize("version, inside_ddp, optimize_ddp", [
    ("2.5.1", True, False),  # the user switched DDPOptimizer off: the lean norm is fine
    ("2.5.1", False, True),  # no DDP
    ("2.6.0", True, True),  # DDPOptimizer takes higher-order ops from 2.6 on
])
def test_everywhere_else_the_lean_norm_stays(version, inside_ddp, optimize_ddp, monkeypatch):
    graphs, messages = compiled_graphs(version, inside_ddp, monkeypatch, optimize_ddp=optimize_ddp)
    assert any(has_higher_order_op(gm) for gm in graphs) and not messages


def test_the_check_sees_the_ddp_forward_that_is_running(tmp_path):
    # The one part that needs no old torch: DDP's own record of the module whose forward runs (what
    # Dynamo itself reads to pick DDPOptimizer). One gloo process.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)
            self.seen = []

        def forward(self, x):
            self.seen.append(ddp_compile._active_ddp_module())
            return self.linear(x)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        probe = Probe()
        ddp = DistributedDataParallel(probe)
        ddp(torch.ones(1, 2))
        probe(torch.ones(1, 2))
        assert probe.seen == [ddp, None]
    finally:
        dist.destroy_process_group()


def test_compiled_ddp_of_the_wrapper_trains_with_eager_gradients(tmp_path, monkeypatch):
    # Real DDP (one gloo process) and this torch's own DDPOptimizer. On torch < 2.6 (CI runs 2.4.1) this
    # is the combination that raised "DDPOptimizer backend: Found a higher order op in the graph".
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    monkeypatch.setattr(ddp_compile, "_warned", False)
    torch._dynamo.reset()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        base, twin = ToyDiT(depth=2), ToyDiT(depth=2)
        twin.load_state_dict(base.state_dict())
        wrapped, eager = anm.ANM(base, alpha=3.0, warmup=0), anm.ANM(twin, alpha=3.0, warmup=0)
        compiled = torch.compile(DistributedDataParallel(wrapped), backend="aot_eager")
        x, t = make_batch()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (compiled(x, t).pow(2).mean() + wrapped.loss()).backward()
        (eager(x, t).pow(2).mean() + eager.loss()).backward()
        for (name, p), q in zip(base.named_parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
        old_torch = TorchVersion(torch.__version__) < (2, 6)
        assert any("optimize_ddp = False" in str(w.message) for w in caught) == old_torch
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
