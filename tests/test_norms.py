import pytest
import torch

import anm
from anm import activation_norms


def test_values_l2_and_rms():
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(activation_norms(x), x.norm(dim=-1))
    torch.testing.assert_close(activation_norms(x, "rms"), x.norm(dim=-1) / 4.0)


def test_update_matches_difference_and_gradients():
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    m = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    for reduce in ("l2", "rms"):
        assert torch.autograd.gradcheck(lambda a, b, r=reduce: activation_norms(a, r, minus=b), (x, m))
        assert torch.autograd.gradcheck(lambda a, r=reduce: activation_norms(a, r), (x,))


def test_gradient_is_zero_not_nan_at_zero_update():
    # adaLN-Zero: the residual update starts at exactly 0.
    x = torch.randn(2, 3, 8, requires_grad=True)
    norms = activation_norms(x, minus=x.detach().clone())
    assert torch.all(norms == 0)
    norms.sum().backward()
    assert torch.all(x.grad == 0)


def test_fp32_accumulation_for_low_precision_inputs():
    x = torch.full((2, 4, 1152), 300.0 / 1152**0.5).half()  # ‖x‖≈300: x.pow(2).sum() overflows in fp16
    assert torch.isinf(x.pow(2).sum(-1)).all()
    norms = activation_norms(x)
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, torch.full((2, 4), 300.0), rtol=1e-3, atol=0)
    b = torch.randn(4, 8, 256).bfloat16()
    torch.testing.assert_close(activation_norms(b), b.float().norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_low_precision_gradient_dtype_and_value():
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16, requires_grad=True)
    m = torch.randn(2, 3, 64, requires_grad=True)  # mixed: fp32 residual stream, bf16 block output
    activation_norms(x, minus=m).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and m.grad.dtype == torch.float32
    diff = x.detach().float() - m.detach()
    torch.testing.assert_close(m.grad, -diff / diff.norm(dim=-1, keepdim=True), rtol=1e-2, atol=1e-2)


def saved_bytes(fn):
    total = []

    def pack(tensor):
        total.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def test_backward_keeps_no_copy_of_the_difference():
    x = torch.randn(8, 16, 256, requires_grad=True)
    m = torch.randn(8, 16, 256, requires_grad=True)
    _, saved = saved_bytes(lambda: activation_norms(x, minus=m))
    big = [t for t in saved if t.numel() == x.numel()]
    # Only references to the inputs themselves (alive anyway), never a new (x - m) tensor.
    assert all(t.data_ptr() in (x.data_ptr(), m.data_ptr()) for t in big)
    _, naive = saved_bytes(lambda: torch.linalg.vector_norm(x - m, dim=-1))
    assert any(t.data_ptr() not in (x.data_ptr(), m.data_ptr()) for t in naive if t.numel() == x.numel())


def test_errors_name_the_fix():
    with pytest.raises(anm.ANMError, match="'l2'"):
        activation_norms(torch.randn(2, 3), "l1")
    with pytest.raises(anm.ANMError, match="site='output'"):
        activation_norms(torch.randn(2, 3), minus=torch.randn(2, 4))
    with pytest.raises(anm.ANMError, match="floating-point"):
        activation_norms(torch.ones(2, 3, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_gradient_of_a_small_update_on_a_large_stream(dtype):
    # Traced, backward computes x·c − minus·c (so that the partitioner saves no difference): with the
    # stream 100× the update, that must run in fp32 or bf16's rounding would swamp the gradient.
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    stream = 100 * torch.randn(4, 8, 64, generator=gen)
    x0, m0 = (stream + torch.randn(4, 8, 64, generator=gen)).to(dtype), stream.to(dtype)
    x, m = x0.clone().requires_grad_(True), m0.clone().requires_grad_(True)
    norms = torch.compile(lambda a, b: activation_norms(a, minus=b), backend="aot_eager")(x, m)
    norms.sum().backward()
    diff = x0.double() - m0.double()
    expected = diff / diff.norm(dim=-1, keepdim=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the result itself is rounded to the input dtype
    torch.testing.assert_close(x.grad.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(m.grad.double(), -expected, rtol=tol, atol=tol)


def test_backward_is_skipped_on_cpu_when_no_norm_gets_a_gradient():
    # Past the hinge every norm's gradient is 0; returning None spares the recompute and two accumulations.
    x = torch.randn(4, 8, 64, requires_grad=True)
    m = torch.randn(4, 8, 64, requires_grad=True)
    anm.anm_loss(activation_norms(x, minus=m), alpha=1e-6).backward()
    assert x.grad is None and m.grad is None
    anm.anm_loss(activation_norms(x, minus=m), alpha=1e6).backward()  # active: a real gradient
    assert x.grad.abs().sum() > 0 and torch.equal(m.grad, -x.grad)
