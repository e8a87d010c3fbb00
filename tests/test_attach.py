"""anm.attach: hooks on the user's own model, and a warm-up clock that counts optimizer steps."""

import copy
import warnings

import pytest
import torch
from toy_models import ToyDiT, make_batch

import anm


def train(model, reg, optimizer_steps, accumulation, scaler_skips=()):
    """Run ``optimizer_steps`` optimizer steps of ``accumulation`` micro-batches; the weight used per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    weights = []
    for step in range(optimizer_steps):
        for micro in range(accumulation):
            x, t = make_batch(batch=2, seed=step * accumulation + micro)
            loss = model(x, t).pow(2).mean() + reg.loss()
            (loss / accumulation).backward()
            if micro == 0:
                weights.append(reg.stats()["anm/weight"])
            else:  # every micro-batch of one optimizer step shares its weight
                assert reg.stats()["anm/weight"] == weights[-1]
        if step not in scaler_skips:  # what GradScaler does after an overflow: no optimizer.step()
            opt.step()
        opt.zero_grad()
    return weights


def test_model_object_stays_the_users_own():
    model = ToyDiT()
    keys = list(model.state_dict())
    reg = anm.attach(model, reduce="rms", alpha=2.0, warmup=0)
    assert type(model) is ToyDiT and list(model.state_dict()) == keys
    model(*make_batch())
    assert reg.loss().item() > 0 and len(reg.names) == 3
    reg.detach()
    model(*make_batch())
    assert reg.loss().item() == 0.0 and not any(b._forward_hooks for b in model.blocks)


def test_context_manager_detaches_also_on_error():
    model = ToyDiT()
    with pytest.raises(KeyError), anm.attach(model, reduce="rms", alpha=2.0):
        raise KeyError("boom")
    assert not any(b._forward_hooks for b in model.blocks)


def test_warmup_weight_per_optimizer_step_is_the_same_with_accumulation_4():
    without = ToyDiT()
    with_accum = copy.deepcopy(without)
    w1 = train(without, anm.attach(without, reduce="rms", alpha=2.0, warmup=6), 8, 1)
    w4 = train(with_accum, anm.attach(with_accum, reduce="rms", alpha=2.0, warmup=6), 8, 4)
    assert w1 == w4 == [anm.warmup_weight(s, 6) for s in range(8)]


def test_skipped_optimizer_steps_do_not_advance_the_warmup():
    model = ToyDiT()
    reg = anm.attach(model, reduce="rms", alpha=2.0, warmup=4)
    weights = train(model, reg, 4, 2, scaler_skips={1})
    assert weights == [0.0, 0.25, 0.25, 0.5]
    assert reg.step == 3


def test_an_optimizer_of_other_parameters_does_not_count():
    model, other = ToyDiT(), torch.nn.Linear(2, 2)
    reg = anm.attach(model, reduce="rms", alpha=2.0)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    other(torch.ones(1, 2)).sum().backward()
    other_opt.step()
    assert reg.step == 0
    sub_opt = torch.optim.SGD(model.blocks[0].parameters(), lr=0.0)  # some of the model's parameters
    sub_opt.step()
    assert reg.step == 1


def test_explicit_step_wins_and_state_resumes():
    model = ToyDiT()
    reg = anm.attach(model, reduce="rms", alpha=2.0, warmup=10)
    model(*make_batch())
    reg.loss(step=torch.tensor(4))  # a 0-dim tensor step, as trainers keep it, is fine
    assert reg.stats()["anm/weight"] == 0.4 and reg.state_dict() == {"step": 4}
    twin = ToyDiT()
    resumed = anm.attach(twin, reduce="rms", alpha=2.0, warmup=10)
    resumed.load_state_dict(reg.state_dict())
    twin(*make_batch())
    resumed.loss()
    assert resumed.stats()["anm/weight"] == 0.4
    for bad in ({}, {"step": -1}, {"step": 1.5}, None):
        with pytest.raises(anm.ANMError, match="step"):
            resumed.load_state_dict(bad)


def test_attaching_twice_is_refused_until_detached():
    model = ToyDiT()
    first = anm.attach(model, reduce="rms", alpha=2.0)
    with pytest.raises(anm.ANMError, match="detach"):
        anm.attach(model, reduce="rms", alpha=2.0)
    with pytest.raises(anm.ANMError, match="detach"):
        anm.ANM(model)
    first.detach()
    anm.attach(model, reduce="rms", alpha=2.0).detach()
    with anm.ActivationCollector(model):  # an analysis collector beside a regulariser is fine
        anm.attach(model, reduce="rms", alpha=2.0).detach()


def test_a_clock_that_never_moves_warns_once():
    model = ToyDiT()
    reg = anm.attach(model, reduce="rms", alpha=2.0, warmup=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(130):  # training steps whose optimizer is not a torch.optim one: nothing counts them
            model(*make_batch(batch=1, tokens=2))
            reg.loss()
    messages = [str(w.message) for w in caught if "warm-up has not moved" in str(w.message)]
    assert len(messages) == 1 and "loss(step=" in messages[0]
    assert caught[0].filename == __file__  # attributed to the caller's line, not anm's internals


@pytest.mark.parametrize("bad, match", [
    (dict(alpha=0.0), "alpha"), (dict(lam=-1.0), "lam"), (dict(warmup=-1), "warmup"),
    (dict(site="middle"), "site"), (dict(reduce="l1"), "reduce"), (dict(nonfinite="ignore"), "nonfinite"),
    (dict(feature_dim="channels"), "feature_dim"), (dict(layers="nothing.*"), "matched no module"),
    (dict(select=3), "select"),
])
def test_bad_arguments_name_the_fix(bad, match):
    with pytest.raises(anm.ANMError, match=match):
        anm.attach(ToyDiT(), **bad)
    with pytest.raises(anm.ANMError, match="nn.Module"):
        anm.attach("not a model")


def test_copies_count_their_own_optimizer_steps():
    import pickle

    model = ToyDiT()
    wrapped = anm.ANM(model, reduce="rms", alpha=2.0, warmup=10)
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    for twin in (copy.deepcopy(wrapped), pickle.loads(pickle.dumps(wrapped))):
        assert twin.step == 1
        twin.loss()
        torch.optim.SGD(twin.model.parameters(), lr=0.0).step()
        assert twin.step == 2 and wrapped.step == 1  # the copy's optimizer moves the copy's clock only
        twin(*make_batch())
        assert twin.loss().item() > 0 and wrapped.collector.records == []


def test_several_optimizers_or_wrapped_optimizers_are_one_step():
    model = ToyDiT()
    reg = anm.attach(model, reduce="rms", alpha=2.0, warmup=100)
    matrices = torch.optim.SGD([p for p in model.parameters() if p.dim() == 2], lr=0.0)
    rest = torch.optim.AdamW([p for p in model.parameters() if p.dim() != 2], lr=0.0)

    class Wrapping(torch.optim.Optimizer):  # Lookahead / ZeroRedundancyOptimizer-style: steps an inner one
        def __init__(self, inner):
            super().__init__(inner.param_groups, {})
            self.inner = inner

        def step(self, closure=None):
            self.inner.step()

    wrapped = Wrapping(torch.optim.SGD(model.parameters(), lr=0.0))
    for _ in range(5):
        model(*make_batch())
        reg.loss()
        matrices.step()
        rest.step()
    for _ in range(5):
        model(*make_batch())
        reg.loss()
        wrapped.step()
    assert reg.step == 10


def test_eval_loops_calling_loss_do_not_count_as_stuck_training():
    model = ToyDiT()
    reg = anm.attach(model, reduce="rms", alpha=2.0, warmup=10)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(200):
            with torch.no_grad():
                model(*make_batch())
            reg.loss()


def test_copies_of_the_bare_model_are_inert_and_do_not_block_attach():
    model = ToyDiT()
    reg = anm.attach(model, reduce="rms", alpha=2.0, warmup=0)
    model(*make_batch())
    ema = copy.deepcopy(model)  # between a forward and loss(): the records are not copied
    reg.loss()
    ema(*make_batch())
    assert reg.collector.records == []
    twin = anm.attach(ema, reduce="rms", alpha=2.0, warmup=0)  # the copied hooks are inert, not a regulariser
    ema(*make_batch())
    assert len(twin.collector.records) == 3 and twin.loss().item() > 0


def test_a_dropped_regularizer_takes_its_hooks_along():
    import gc

    model = ToyDiT()
    anm.attach(model, reduce="rms", alpha=2.0)
    gc.collect()
    assert not any(block._forward_hooks for block in model.blocks)
    wrapped = anm.ANM(model, reduce="rms", alpha=2.0)
    del wrapped
    gc.collect()
    assert not any(block._forward_hooks for block in model.blocks)
    anm.attach(model, reduce="rms", alpha=2.0).detach()


def test_a_container_given_as_layers_means_its_blocks():
    model = ToyDiT()
    for layers in (model.blocks, "blocks", model.blocks.children()):
        reg = anm.attach(model, layers=layers, reduce="rms", alpha=2.0, warmup=0)
        assert reg.names == ["blocks.0", "blocks.1", "blocks.2"]
        model(*make_batch())
        assert reg.loss().item() > 0
        reg.detach()


def test_hooks_that_never_run_in_training_warn_once():
    model = ToyDiT()
    reg = anm.attach(model, layers="head", site="output", reduce="rms", alpha=2.0)
    model.head = torch.nn.Linear(32, 6)  # the hooked module is no longer on the forward path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(10):
            model(*make_batch())
            reg.loss()
    assert len([w for w in caught if "did not run" in str(w.message)]) == 1


def test_a_second_loss_call_under_compile_is_not_taken_for_a_stale_graph():
    model = ToyDiT()
    reg = anm.attach(model, reduce="rms", alpha=2.0, warmup=0)
    compiled = torch.compile(model, backend="aot_eager")
    compiled(*make_batch())
    assert reg.loss().item() > 0
    assert reg.loss().item() == 0.0  # nothing new recorded: 0, as in eager mode, not "call torch.compiler.reset()"
    reg.detach()
    torch.compiler.reset()
