"""ANM inside a real training stack: torch.compile, activation checkpointing, DDP, autocast."""

import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP
from toy_models import ToyDiT, make_batch

import anm
from anm import ANM

ALPHA = 3.0  # the toy's update norms straddle this, so the hinge is active for some tokens


def twin_models(depth=2, **kw):
    torch.manual_seed(0)
    a = ToyDiT(depth=depth, **kw)
    b = ToyDiT(depth=depth, **kw)
    b.load_state_dict(a.state_dict())
    return a, b


def train_step(model, wrapper, x, t, step=3):
    out = model(x, t)
    loss = out.pow(2).mean() + wrapper.loss(step=step)
    loss.backward()
    return loss.detach()


def assert_same_grads(a, b, atol=1e-6):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=atol, msg=name)


# -- torch.compile -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_gives_eager_gradients(backend):
    torch._dynamo.reset()
    eager_base, compiled_base = twin_models()
    eager, wrapped = ANM(eager_base, alpha=ALPHA, warmup=5), ANM(compiled_base, alpha=ALPHA, warmup=5)
    compiled = torch.compile(wrapped, fullgraph=True, backend=backend)
    x, t = make_batch()
    for step in range(2):  # the second call reuses the compiled graph
        eager_loss = train_step(eager, eager, x, t, step=step + 2)
        compiled_loss = train_step(compiled, wrapped, x, t, step=step + 2)
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert wrapped.stats()["anm/loss"] > 0
    assert_same_grads(compiled_base, eager_base, atol=1e-5)


def test_wrapping_an_already_compiled_model():
    torch._dynamo.reset()
    eager_base, compiled_base = twin_models()
    eager = ANM(eager_base, alpha=ALPHA, warmup=0)
    wrapped = ANM(torch.compile(compiled_base, backend="aot_eager"), alpha=ALPHA, warmup=0)
    assert wrapped.collector.names == ["blocks.0", "blocks.1"]  # `_orig_mod.` is stripped
    x, t = make_batch()
    torch.testing.assert_close(train_step(wrapped, wrapped, x, t), train_step(eager, eager, x, t))
    assert_same_grads(compiled_base, eager_base, atol=1e-5)


def saved_for_backward_bytes(model, wrapper, x, t) -> int:
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x, t).pow(2).mean() + (wrapper.loss() if wrapper is not None else 0)
    loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("site", ["update", "output"])
def test_compiled_anm_saves_only_the_norms_for_backward(site):
    # A compiled baseline keeps normalised activations, not the residual stream; the partitioner would
    # rather save x − input (one activation per block) than recompute it, unless backward avoids it.
    torch._dynamo.reset()
    base, hooked = twin_models(depth=3)
    wrapper = ANM(hooked, alpha=ALPHA, warmup=0, site=site)
    x, t = make_batch(batch=8, tokens=64)
    plain = torch.compile(base, backend="aot_eager_decomp_partition")
    compiled = torch.compile(wrapper, backend="aot_eager_decomp_partition")
    try:
        saved_for_backward_bytes(plain, None, x, t)  # compile
    except torch._dynamo.exc.TorchRuntimeError as error:  # torch 2.4: the baseline alone, no ANM involved
        if "data pointer" not in str(error):
            raise
        pytest.skip("this torch's Dynamo runs saved_tensors_hooks on fake tensors while tracing (seen on 2.4.1), "
                    "so saved bytes cannot be counted under compile")
    saved_for_backward_bytes(compiled, wrapper, x, t)  # compile
    extra = saved_for_backward_bytes(compiled, wrapper, x, t) - saved_for_backward_bytes(plain, None, x, t)
    activation = x.shape[0] * x.shape[1] * 32 * 4  # one fp32 (batch, tokens, dim=32) tensor: 64 KiB
    assert extra < activation / 2, f"{extra} bytes saved beyond the baseline; one activation is {activation}"


@pytest.mark.parametrize("compiled_first", ["same instance", "another instance"])
def test_graph_compiled_before_the_hooks_is_a_clear_error_not_a_silent_zero(compiled_first):
    # Dynamo does not guard on module hooks: a graph of ToyDiT.forward traced without them is reused.
    # Whether another instance's graph is reused depends on the torch release (2.4 recompiles for a new
    # instance, later ones do not), so the test asks what it must never be: a silent zero.
    torch._dynamo.reset()
    plain, hooked = twin_models()
    x, t = make_batch()
    compiled = torch.compile(hooked, backend="eager")
    if compiled_first == "same instance":
        compiled(x, t)
    else:
        torch.compile(plain, backend="eager")(x, t)
    wrapped = ANM(hooked, alpha=ALPHA, warmup=0)
    compiled(x, t)
    if wrapped.collector.records:  # this torch recompiled with the hooks: nothing stale
        assert wrapped.loss().item() > 0
        return
    with pytest.raises(anm.ANMError, match=r"ToyDiT\.forward.*torch\.compiler\.reset\(\)"):
        wrapped.loss()
    torch.compiler.reset()  # the fix the error names
    compiled(x, t)
    assert wrapped.loss().item() > 0


def test_stale_graph_check_is_available_on_this_torch():
    # Without Dynamo's cache-entry helper the stale-graph check can only warn; CI runs this on the
    # oldest and the newest torch, so a release that moves the helper is noticed here.
    assert anm.compiled.cache_entry_lister() is not None, f"torch {torch.__version__} moved the helper"


def test_an_unavailable_stale_graph_check_warns_instead_of_passing_silently(monkeypatch):
    # A training step that records nothing is what a stale graph looks like; a forward under no_grad
    # produces the same on any torch, without depending on which graphs a release reuses.
    _, hooked = twin_models()
    wrapped = ANM(hooked, alpha=ALPHA, warmup=0)
    monkeypatch.setattr(anm.compiled, "cache_entry_lister", lambda: None)
    with torch.no_grad():
        wrapped(*make_batch())
    with pytest.warns(UserWarning, match=r"no way to check.*torch\.compiler\.reset\(\)"):
        assert wrapped.loss().item() == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per regulariser
        wrapped.loss()



def test_compiled_model_in_eval_or_wrapped_first_raises_nothing():
    torch._dynamo.reset()
    base, _ = twin_models()
    wrapped = ANM(base, alpha=ALPHA, warmup=0)
    compiled = torch.compile(base, backend="eager")  # wrapped before the first compiled call: hooks traced
    x, t = make_batch()
    compiled(x, t)
    assert wrapped.loss().item() > 0
    base.eval()
    with torch.no_grad():
        compiled(x, t)
    assert wrapped.loss().item() == 0.0  # nothing recorded in eval mode is normal, not an error


def test_compiled_model_with_every_norm_skipped_as_nonfinite_is_not_called_stale():
    torch._dynamo.reset()
    base, _ = twin_models()
    wrapped = ANM(base, alpha=ALPHA, warmup=0, nonfinite="skip", site="output")
    compiled = torch.compile(base, backend="eager")
    x, t = make_batch()
    compiled(torch.full_like(x, float("nan")), t)  # recorded, then dropped: not a graph without hooks
    with pytest.warns(UserWarning, match="skipping non-finite"):
        assert wrapped.loss().item() == 0.0


# -- activation checkpointing --------------------------------------------------------------------------
def test_non_reentrant_checkpointing_same_gradients_no_double_count():
    plain_base, ckpt_base = twin_models(depth=3)
    ckpt_base.checkpointing = "non-reentrant"
    plain, ckpt = ANM(plain_base, alpha=ALPHA, warmup=0), ANM(ckpt_base, alpha=ALPHA, warmup=0)
    x, t = make_batch()
    out = ckpt(x, t)
    assert len(ckpt.collector.records) == 3
    loss = out.pow(2).mean() + ckpt.loss()
    loss.backward()  # replays each block's forward: its hook must not record again
    assert ckpt.collector.records == []
    torch.testing.assert_close(loss.detach(), train_step(plain, plain, x, t, step=0))
    assert_same_grads(ckpt_base, plain_base)


def test_compile_with_checkpointing_needs_graph_breaks_but_stays_correct():
    torch._dynamo.reset()
    plain_base, ckpt_base = twin_models()
    ckpt_base.checkpointing = "non-reentrant"
    plain, wrapped = ANM(plain_base, alpha=ALPHA, warmup=0), ANM(ckpt_base, alpha=ALPHA, warmup=0)
    compiled = torch.compile(wrapped, backend="aot_eager")  # fullgraph=False: dynamo splits at checkpoint
    x, t = make_batch()
    torch.testing.assert_close(train_step(compiled, wrapped, x, t), train_step(plain, plain, x, t))
    assert_same_grads(ckpt_base, plain_base, atol=1e-5)


def test_reentrant_checkpointing_is_a_clear_error_not_a_silent_zero():
    base = ToyDiT()
    base.checkpointing = "reentrant"
    model = ANM(base)
    x, t = make_batch()
    x.requires_grad_(True)  # reentrant checkpoint needs a grad-requiring input to backprop at all
    with pytest.raises(anm.ANMError, match="use_reentrant=False"):
        model(x, t)


def test_frozen_prefix_under_no_grad_is_not_mistaken_for_checkpointing():
    model = ANM(ToyDiT(depth=2))
    x, t = make_batch()
    with torch.no_grad():  # inputs do not require grad: just an ordinary no_grad forward
        model(x, t)
    assert model.collector.records == []


# -- DDP / FSDP2: two gloo processes, each on half the batch, against one process on all of it ---------
def _finish_rank(out_dir, rank, names, grads):
    torch.save((names, grads), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    # Leave without interpreter teardown: gloo's threads can abort a process at exit ("terminate called
    # without an active exception"), which would fail the test after the results are already written.
    os._exit(0)


def _assert_ranks_match_one_process_on_the_full_batch(worker, tmp_path, *worker_args):
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(worker, args=(2, init_file, str(tmp_path), *worker_args), nprocs=2, join=True)
    torch.manual_seed(0)
    base = ToyDiT(depth=2)
    single = ANM(base, alpha=ALPHA, warmup=0)
    x, t = make_batch(batch=8)
    (single(x, t).pow(2).mean() + single.loss()).backward()
    for rank in range(2):
        names, grads = torch.load(tmp_path / f"rank{rank}.pt")
        assert names == ["blocks.0", "blocks.1"]
        for name, p in base.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def _ddp_worker(rank, world, init_file, out_dir, find_unused, wrap_order):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = ToyDiT(depth=2)
    x, t = make_batch(batch=8)
    shard = slice(rank * 4, rank * 4 + 4)
    if wrap_order == "ddp(anm)":
        wrapper = ANM(base, alpha=ALPHA, warmup=0)
        model = DDP(wrapper, find_unused_parameters=find_unused)
    else:
        model = DDP(base, find_unused_parameters=find_unused)
        wrapper = ANM(model, alpha=ALPHA, warmup=0)
    for _ in range(2):  # two steps: the reducer must be ready again for the second
        base.zero_grad()
        out = model(x[shard], t[shard])
        (out.pow(2).mean() + wrapper.loss()).backward()
    _finish_rank(out_dir, rank, wrapper.collector.names, {n: p.grad for n, p in base.named_parameters()})


@pytest.mark.parametrize("find_unused", [False, True])
@pytest.mark.parametrize("wrap_order", ["ddp(anm)", "anm(ddp)"])
def test_ddp_two_processes_match_one_process_on_the_full_batch(find_unused, wrap_order, tmp_path):
    _assert_ranks_match_one_process_on_the_full_batch(_ddp_worker, tmp_path, find_unused, wrap_order)


def _fsdp_worker(rank, world, init_file, out_dir, wrap_order):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    base = ToyDiT(depth=2)
    if wrap_order == "anm-then-shard":
        wrapper = ANM(base, alpha=ALPHA, warmup=0)
    for block in base.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(base, mesh=mesh)
    if wrap_order == "shard-then-anm":
        wrapper = ANM(base, alpha=ALPHA, warmup=0)
    x, t = make_batch(batch=8)
    shard = slice(rank * 4, rank * 4 + 4)
    for _ in range(2):
        base.zero_grad()
        (wrapper(x[shard], t[shard]).pow(2).mean() + wrapper.loss()).backward()
    grads = {name: p.grad.full_tensor() for name, p in base.named_parameters()}  # DTensor shards → whole
    _finish_rank(out_dir, rank, wrapper.collector.names, grads)


@pytest.mark.parametrize("wrap_order", ["anm-then-shard", "shard-then-anm"])
def test_fsdp2_two_processes_match_one_process_on_the_full_batch(wrap_order, tmp_path):
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("torch.distributed.fsdp.fully_shard is public from torch 2.6 on")
    _assert_ranks_match_one_process_on_the_full_batch(_fsdp_worker, tmp_path, wrap_order)
