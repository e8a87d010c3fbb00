"""Training forwards without loss(): bounded memory and one warning that names the fix."""

import gc
import warnings

import torch
from toy_models import ToyDiT, make_batch

import anm
from anm.collector import MAX_PENDING_FORWARDS


def live_tensor_bytes():
    gc.collect()
    return sum(o.numel() * o.element_size() for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_records_stay_bounded_and_warn_once():
    model = anm.ANM(ToyDiT(depth=2), reduce="rms", alpha=2.0, warmup=0)
    x, t = make_batch(batch=8, tokens=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(MAX_PENDING_FORWARDS):
            model(x, t)
        assert not [w for w in caught if "without a loss() call" in str(w.message)]
        settled = live_tensor_bytes()
        for _ in range(400):
            model(x, t)
    assert len(model.collector.records) == MAX_PENDING_FORWARDS * 2
    messages = [str(w.message) for w in caught if "without a loss() call" in str(w.message)]
    assert len(messages) == 1 and ".loss()" in messages[0] and "no_grad" in messages[0]
    assert live_tensor_bytes() <= settled * 1.05  # 400 more forwards kept nothing more alive
    assert model.loss().item() > 0  # the newest forwards are still there to regularise


def test_loss_every_step_never_warns():
    model = anm.ANM(ToyDiT(depth=2), reduce="rms", alpha=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3 * MAX_PENDING_FORWARDS):
            model(*make_batch())
            model.loss()


def test_the_warning_points_at_the_users_code_not_at_torch_or_anm():
    model = anm.ANM(ToyDiT(depth=2), reduce="rms", alpha=2.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(MAX_PENDING_FORWARDS + 1):
            model(*make_batch())
    [warning] = [w for w in caught if "without a loss() call" in str(w.message)]
    assert warning.filename.endswith("toy_models.py")  # the model's own forward, which called the block
