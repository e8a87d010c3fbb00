"""What ANM does on an adaLN-Zero model at its first steps (docs/faq.md): the gates start at 0, so every
block's update is exactly 0, the hinge term is λ·w (every norm is 0 < α) and its gradient is 0 until the
task loss has moved the gates."""

import torch
from toy_models import ToyDiT, make_batch

import anm

LAM, WARMUP = 10.0, 4


def anm_gradient_norm(wrapped) -> float:
    grads = [p.grad for p in wrapped.parameters() if p.grad is not None]
    return float(torch.stack([g.norm() for g in grads]).norm()) if grads else 0.0


def test_adaln_zero_term_is_lam_times_weight_with_no_gradient_until_the_gates_move():
    torch.manual_seed(0)
    wrapped = anm.ANM(ToyDiT(zero_init=True), alpha=3.0, lam=LAM, warmup=WARMUP)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    seen = []
    for step in range(3):
        x, t = make_batch(seed=step)
        task = wrapped(x, t).pow(2).mean()
        term = wrapped.loss()
        opt.zero_grad(set_to_none=True)
        term.backward(retain_graph=True)  # the ANM term's own gradient first
        seen.append((term.item(), anm_gradient_norm(wrapped), wrapped.stats()["anm/frac_below_alpha"]))
        opt.zero_grad(set_to_none=True)
        (task + term).backward()
        opt.step()
    (term0, grad0, below0), (term1, grad1, _), (term2, grad2, _) = seen
    assert term0 == 0.0 and grad0 == 0.0 and below0 == 1.0  # w(0) = 0; every update is exactly 0
    assert abs(term1 - LAM * 1 / WARMUP) < 1e-2 * LAM  # λ·w(1)·relu(1 − ‖≈0‖/α) ≈ λ·w
    assert grad1 > 0 and grad2 > 0  # the task loss moved the gates at step 0: the term now has a gradient


def test_before_any_step_the_term_of_an_adaln_zero_model_has_no_gradient_at_full_weight():
    torch.manual_seed(0)
    wrapped = anm.ANM(ToyDiT(zero_init=True), alpha=3.0, lam=LAM, warmup=0)
    wrapped(*make_batch())
    term = wrapped.loss()
    term.backward()
    assert term.item() == LAM  # every norm is exactly 0
    assert anm_gradient_norm(wrapped) == 0.0
