"""The caveats docs/faq.md states about copies, process-wide state and reading records hold."""

import copy

from torch.optim import optimizer as torch_optimizer
from toy_models import ToyDiT, make_batch

import anm
from anm import steps

ALPHA = 3.0


def test_an_ema_copied_after_attach_keeps_inert_hooks_that_detach_leaves_on_it():
    model = ToyDiT()
    reg = anm.attach(model, alpha=ALPHA, warmup=0)
    ema = copy.deepcopy(model)
    reg.detach()
    assert [len(block._forward_hooks) for block in model.blocks] == [0, 0, 0]
    assert [len(block._forward_hooks) for block in ema.blocks] == [1, 1, 1]  # still there
    ema.train()
    ema(*make_batch())
    collectors = {id(hook.collector): hook.collector for b in ema.blocks for hook in b._forward_hooks.values()}
    assert [(c.active, c.records) for c in collectors.values()] == [(False, [])]  # inert: records nothing
    again = anm.attach(ema, alpha=ALPHA, warmup=0)  # the copy can be attached to
    ema(*make_batch())
    assert again.loss().item() > 0
    again.detach()


def test_an_ema_of_the_bare_model_pairs_with_the_wrapped_model_not_the_wrapper():
    model = ToyDiT()
    ema = copy.deepcopy(model)  # made before wrapping
    wrapped = anm.ANM(model, alpha=ALPHA, warmup=0)
    ema_names = set(dict(ema.named_parameters()))
    assert not ema_names & set(dict(wrapped.named_parameters()))  # "model." prefix on the wrapper's
    assert ema_names == set(dict(wrapped.model.named_parameters()))
    assert ema.state_dict().keys() == wrapped.state_dict().keys()
    wrapped.close()


def test_one_process_wide_optimizer_hook_outlives_detach():
    regs = [anm.attach(ToyDiT(), alpha=ALPHA, warmup=0) for _ in range(3)]
    handle = steps._hook_handle
    global_hooks = torch_optimizer._global_optimizer_post_hooks
    ours = [hook for hook in global_hooks.values() if hook is steps._on_any_optimizer_step]
    assert handle is not None and len(ours) == 1
    for reg in regs:
        reg.detach()
    assert steps._hook_handle is handle and handle.id in global_hooks


def test_reading_norms_does_not_consume_them():
    net = ToyDiT()
    with anm.ActivationCollector(net, site="output") as collector:
        net(*make_batch())
        net(*make_batch())
        assert len(collector.norms()) == len(collector.norms()) == 6  # 2 forwards × 3 blocks, read twice
        assert len(collector.pop()) == 6 and collector.norms() == []
