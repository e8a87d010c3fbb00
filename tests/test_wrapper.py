import copy
import gc
import inspect
import warnings

import pytest
import torch
from fake_cuda import FakeCuda
from numerics import assert_same_sums
from torch import nn
from toy_models import ToyDiT, make_batch, reference_anm

import anm
from anm import ANM


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.orders
@pytest.mark.parametrize("site", ["update", "output"])
@pytest.mark.parametrize("reduce", ["l2", "rms"])
def test_gradients_equal_hook_free_reference(site, reduce):
    torch.manual_seed(0)
    base = ToyDiT(depth=3)
    x, t = make_batch()
    alpha = 2.0 if reduce == "l2" else 0.4  # some tokens on each side of alpha
    ref_out, ref_anm = reference_anm(base, x, t, alpha, lam=10.0, weight=0.25, site=site, rms=reduce == "rms")
    (ref_out.pow(2).mean() + ref_anm).backward()
    expected = grads(base)
    base.zero_grad()

    model = ANM(base, alpha=alpha, lam=10.0, warmup=4, site=site, reduce=reduce)
    out = model(x, t)
    loss = model.loss(step=1)  # warm-up weight 0.25
    torch.testing.assert_close(loss, ref_anm)
    assert 0 < loss.item() < 10
    (out.pow(2).mean() + loss).backward()
    got = {k.removeprefix("model."): v for k, v in grads(model).items()}
    assert got.keys() == expected.keys()
    for name in expected:
        assert_same_sums(got[name], expected[name], msg=name)  # another summation order (tests/numerics.py)


def test_returns_exactly_what_the_model_returns():
    base = ToyDiT()
    model = ANM(base)
    x, t = make_batch()
    torch.testing.assert_close(model(x, t), base(x, t), rtol=0, atol=0)


def test_attributes_fall_through_and_cfg_calls_are_collected():
    model = ANM(ToyDiT(depth=2), site="output", warmup=0)
    assert model.checkpointing is None and isinstance(model.head, nn.Linear)
    model.forward_with_cfg(*make_batch(), scale=4.0)
    assert len(model.collector.records) == 4  # two passes × two blocks, each counted once
    assert model.loss().item() > 0
    with pytest.raises(AttributeError):
        _ = model.not_an_attribute


def test_several_forwards_count_once_each():
    model = ANM(ToyDiT(depth=2), alpha=50.0, warmup=0)
    x, t = make_batch()
    x2, t2 = make_batch(seed=1)
    model(x, t)
    model(x2, t2)
    both = model.loss()
    model(x, t)
    first = model.loss()
    model(x2, t2)
    second = model.loss()
    torch.testing.assert_close(both, (first + second) / 2)


def test_eval_and_no_grad_record_nothing_and_loss_is_a_safe_zero():
    model = ANM(ToyDiT())
    x, t = make_batch()
    model.eval()
    model(x, t)
    model.train()
    with torch.no_grad():
        model(x, t)
    loss = model.loss()
    assert loss.item() == 0.0 and not loss.requires_grad and loss.dim() == 0
    total = model(x, t).sum() * 0 + loss  # adding it to a real loss is fine
    total.backward()


def test_state_dict_is_the_models_and_loads_checkpoints_both_ways():
    base = ToyDiT()
    model = ANM(base)
    assert list(model.state_dict()) == list(base.state_dict())
    other = ToyDiT()
    model.load_state_dict(other.state_dict())  # a plain checkpoint loads into the wrapper (strict)
    torch.testing.assert_close(base.head.weight, other.head.weight)
    fresh = ToyDiT()
    fresh.load_state_dict(model.state_dict())  # and the wrapper's checkpoint loads into a plain model
    torch.testing.assert_close(fresh.head.weight, other.head.weight)
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({k: v for k, v in other.state_dict().items() if k != "head.bias"})


def test_state_dict_when_nested_in_another_module():
    outer = nn.Module()
    outer.net = ANM(ToyDiT())
    keys = list(outer.state_dict())
    assert keys == ["net." + k for k in ToyDiT().state_dict()]
    source = ToyDiT()
    outer.load_state_dict({"net." + k: v for k, v in source.state_dict().items()})
    torch.testing.assert_close(outer.net.model.embed.weight, source.embed.weight)


def test_warmup_position_is_resumable():
    model = ANM(ToyDiT(), warmup=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(3):
        model.loss()
        opt.step()
    state = model.anm_state_dict()
    assert state == {"step": 3}
    resumed = ANM(ToyDiT(), warmup=10)
    resumed.load_anm_state_dict(state)
    model(*make_batch())
    resumed.load_state_dict(model.state_dict())
    resumed(*make_batch())
    torch.testing.assert_close(model.loss(), resumed.loss())
    assert model.stats()["anm/weight"] == resumed.stats()["anm/weight"] == 0.3
    with pytest.raises(anm.ANMError, match="anm_state_dict"):
        resumed.load_anm_state_dict({})


def test_stats_are_detached_floats_per_layer():
    model = ANM(ToyDiT(depth=2), alpha=3.0, warmup=0)
    assert model.stats() == {}
    model(*make_batch())
    records = [(index, norms.detach()) for index, norms in model.collector.records]
    loss = model.loss()
    stats = model.stats()
    assert set(stats) == {"anm/loss", "anm/weight", "anm/step", "anm/frac_below_alpha", "anm/norm/blocks.0",
                          "anm/norm/blocks.1"}
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["anm/loss"] == pytest.approx(loss.item())
    assert 0.0 <= stats["anm/frac_below_alpha"] <= 1.0
    for index, name in enumerate(["blocks.0", "blocks.1"]):
        norms = torch.cat([n.reshape(-1) for i, n in records if i == index])
        assert stats[f"anm/norm/{name}"] == pytest.approx(norms.mean().item())
    every = torch.cat([n.reshape(-1) for _, n in records])
    assert stats["anm/frac_below_alpha"] == pytest.approx((every < 3.0).float().mean().item())


def test_no_memory_or_graph_kept_alive_over_many_steps():
    model = ANM(ToyDiT(dim=16, depth=2), warmup=0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x, t = make_batch(batch=2, tokens=3)

    def step():
        out = model(x, t)
        (out.pow(2).mean() + model.loss()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(20):
        step()
    gc.collect()
    baseline = sum(isinstance(o, torch.Tensor) for o in gc.get_objects())
    for _ in range(1000):
        step()
    gc.collect()
    assert sum(isinstance(o, torch.Tensor) for o in gc.get_objects()) <= baseline
    assert model.collector.records == []
    assert all(not n.requires_grad for _, n in model.regularizer._last_records())


def test_nonfinite_norms_raise_naming_the_layer_or_are_skipped():
    def poison(model):
        with torch.no_grad():
            model.blocks[1].proj.bias.fill_(float("nan"))

    model = ANM(ToyDiT(depth=3), warmup=0)
    poison(model)
    model(*make_batch())
    with pytest.raises(anm.ANMError, match=r"non-finite.* at step 5 in layer\(s\) \['blocks.1'.*nonfinite='skip'"):
        model.loss(step=5)  # on the CPU the check is immediate, and names the step all the same
    model = ANM(ToyDiT(depth=3), warmup=0, nonfinite="skip", site="output")
    with torch.no_grad():
        model.blocks[2].proj.bias.fill_(float("nan"))
    model(*make_batch())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = model.loss()
    assert torch.isfinite(loss) and "blocks.2" in str(caught[0].message)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"alpha": 0}, "alpha must be"), ({"lam": -1}, "lam must be"), ({"warmup": -1}, "warmup must be"),
     ({"site": "input"}, "unknown site"), ({"objective": "hinge2"}, "unknown objective"),
     ({"reduce": "max"}, "unknown reduce"), ({"nonfinite": "ignore"}, "unknown nonfinite"),
     ({"layers": "nothing.*"}, "matched no module"), ({"granularity": "layer"}, "unknown granularity")],
)
def test_invalid_configuration_is_one_clear_error(kwargs, match):
    with pytest.raises(anm.ANMError, match=match):
        ANM(ToyDiT(), **kwargs)


def test_unwrap_and_close_remove_every_hook():
    base = ToyDiT()
    model = ANM(base)
    assert all(len(b._forward_hooks) == 1 for b in base.blocks)
    assert model.unwrap() is base
    assert all(len(b._forward_hooks) == 0 for b in base.blocks)
    model.close()  # twice is fine


def test_bf16_autocast_norms_are_fp32_and_match():
    model = ANM(ToyDiT(), site="output", alpha=50.0, warmup=0)
    x, t = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t)
    assert all(n.dtype == torch.float32 for n in model.collector.norms())
    low_norms = [n.detach() for n in model.collector.norms()]
    low = model.loss()
    model(x, t)
    full_norms = [n.detach() for n in model.collector.norms()]
    torch.testing.assert_close(low, model.loss(), rtol=2e-2, atol=1e-3)
    for a, b in zip(low_norms, full_norms, strict=True):  # bf16 matmuls move each norm by ~0.3%
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("objective, granularity, warmup_kind", [("exp", "sample", "cosine"),
                                                                 ("hinge", "batch", "linear")])
def test_objective_granularity_and_warmup_kind_reach_the_loss(objective, granularity, warmup_kind):
    base = ToyDiT()
    x, t = make_batch()
    with anm.ActivationCollector(base) as probe:  # alpha at the median norm: the hinge is active for some
        base(x, t)
        alpha = torch.cat([n.reshape(-1) for n in probe.norms()]).median().item()
    model = ANM(base, alpha=alpha, warmup=8, objective=objective, granularity=granularity,
                warmup_kind=warmup_kind)
    model(x, t)
    norms = [n.detach() for n in model.collector.norms()]
    weight = anm.warmup_weight(2, 8, warmup_kind)
    expected = anm.anm_loss(norms, alpha, 10.0, objective, weight, granularity)
    assert not torch.allclose(expected, anm.anm_loss(norms, alpha, 10.0, "hinge", 2 / 8, "token"))  # it matters
    torch.testing.assert_close(model.loss(step=2).detach(), expected)
    module = anm.ANMLoss(alpha, 10.0, warmup=8, objective=objective, granularity=granularity,
                         warmup_kind=warmup_kind)
    torch.testing.assert_close(module(norms, step=2), expected)


def test_step_counts_optimizer_steps_and_an_explicit_step_resets_it():
    model = ANM(ToyDiT(), warmup=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model.loss()
    model.loss()  # two loss() calls, no optimizer step yet: still step 0
    assert model.step == 0 and model.stats()["anm/step"] == 0.0
    opt.step()
    assert model.step == 1
    model.loss(step=10)
    assert model.step == 10 and model.stats()["anm/weight"] == 1.0
    opt.step()
    assert model.step == 11  # counting goes on from the explicit step
    with pytest.raises(anm.ANMError, match="step must be >= 0"):
        model.loss(step=-1)


def test_deepcopy_gives_an_independent_wrapper():
    import copy

    model = ANM(ToyDiT(depth=2), warmup=0)
    twin = copy.deepcopy(model)  # e.g. an EMA copy or a second run made from the wrapped model
    twin(*make_batch())
    assert model.collector.records == [] and len(twin.collector.records) == 2
    assert twin.collector.layers[0][1] is twin.model.blocks[0]
    assert twin.loss().item() > 0 and model.loss().item() == 0.0


def test_copy_of_the_bare_model_does_not_record_into_the_original():
    import copy

    base = ToyDiT(depth=2)
    model = ANM(base, warmup=0)
    ema = copy.deepcopy(base)  # hooks come along, but with their own collector
    ema(*make_batch())
    assert model.collector.records == []


def test_deferred_nonfinite_check_raises_on_the_next_call_naming_layer_and_step(monkeypatch):
    # On CUDA the check is queued without a device sync and read by the next loss()/stats(); fake_cuda
    # stands in for the GPU here (the CPU path checks at once).
    FakeCuda().install(monkeypatch, flags_on=torch.device("cuda", 0))
    model = ANM(ToyDiT(depth=3), warmup=0)
    with torch.no_grad():
        model.blocks[1].proj.bias.fill_(float("nan"))
    model(*make_batch())
    model.loss(step=7)  # no error yet: the flag is on its way to the host
    with pytest.raises(anm.ANMError, match=r"at step 7 in layer\(s\) \['blocks.1'"):
        model.stats()
    assert not model.regularizer._host_flag.pending
    with torch.no_grad():
        model.blocks[1].proj.bias.zero_()
    model(*make_batch())
    model.loss()
    model.loss()  # a finite step passes, and its flag is read
    assert not model.regularizer._host_flag.pending


class NamedInputs(nn.Module):
    """A model whose forward names its inputs, as HF models do (Trainer keeps only those columns)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2))

    def forward(self, input_ids, attention_mask=None, *, labels=None):
        for block in self.blocks:
            input_ids = block(input_ids)
        return input_ids


def test_forward_shows_the_models_signature_also_on_copies():
    wrapped = ANM(NamedInputs(), site="output", alpha=5.0, warmup=0)
    expected = inspect.signature(wrapped.model.forward)
    assert inspect.signature(wrapped.forward) == expected
    assert list(inspect.signature(wrapped.forward).parameters) == ["input_ids", "attention_mask", "labels"]
    copy_ = copy.deepcopy(wrapped)
    assert inspect.signature(copy_.forward) == expected
    copy_(torch.randn(2, 4))  # the copy's forward runs the copy's model and records into the copy
    assert copy_.loss().item() > 0 and wrapped.loss().item() == 0.0


def test_a_subclass_forward_keeps_its_own_signature_and_runs():
    class Scaled(ANM):
        def forward(self, x, scale=2.0):
            return self.model(x) * scale

    wrapped = Scaled(NamedInputs(), site="output", alpha=5.0, warmup=0)
    assert list(inspect.signature(wrapped.forward).parameters) == ["x", "scale"]
    torch.testing.assert_close(wrapped(torch.ones(1, 4), scale=3.0), wrapped.model(torch.ones(1, 4)) * 3.0)
