"""``anm.attach`` inside the trainers people use: HF ``Trainer``, Lightning, accelerate (CPU, tiny models
built from configs, no downloads). Each test skips when its package is missing (``pip install -e ".[integrations]"``).

The recipe classes below (``ANMTrainer``, ``LitANM``) are the ones in docs/integrations.md, verbatim: a test
checks it. The warm-up step passed to ``reg.loss`` is always the *optimizer* step, also under gradient
accumulation, and these tests check that each trainer's counter gives exactly that.
"""

from __future__ import annotations

import csv
import inspect
import textwrap
from pathlib import Path

import pytest
import torch
from numerics import assert_same_sums
from torch import nn

import anm

try:
    import transformers
except ImportError:  # the HF tests skip
    transformers = None
try:
    import lightning as L
except ImportError:  # the Lightning tests skip
    L = None

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
WARMUP = 8  # warm-up weights 0, 1/8, 2/8, ... differ at every optimizer step of these short runs


def tiny_transformer(seed: int = 0) -> nn.Module:
    """A plain-torch token model: 8 features in, two encoder blocks of width 32, 8 features out."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(32, nhead=2, dim_feedforward=64, dropout=0.0, batch_first=True)
    blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return nn.Sequential(nn.Linear(8, 32), blocks, nn.Linear(32, 8))


def token_data(n: int = 16) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, 8, generator=gen)
    return torch.utils.data.TensorDataset(x, x.flip(-1))


def weight(step: int) -> float:
    return anm.warmup_weight(step, WARMUP)


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 0.0) -> None:
    sb = b.state_dict()
    for name, tensor in a.state_dict().items():
        torch.testing.assert_close(tensor, sb[name], rtol=0, atol=atol, msg=name)


# == HF Trainer =========================================================================================
if transformers is not None:

    class ANMTrainer(transformers.Trainer):
        """transformers.Trainer that adds the ANM term of `anm_reg` (from anm.attach) to the training loss."""

        def __init__(self, *args, anm_reg, **kwargs):
            super().__init__(*args, **kwargs)
            self.anm_reg = anm_reg

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            if model.training:  # not in evaluate() / predict()
                term = self.anm_reg.loss(step=self.state.global_step)  # optimizer steps taken so far
                if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
                    # The task loss is already this micro-batch's share of the accumulated batch (Trainer
                    # will not divide it by the accumulation steps): give the ANM term the same share.
                    term = term / self.args.gradient_accumulation_steps
                loss = loss + term
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if "loss" in logs:  # training logs get anm/loss, anm/weight, anm/norm/<layer>, ...
                logs.update(self.anm_reg.stats())
            super().log(logs, *args, **kwargs)


def gpt2(seed: int = 0, tie_word_embeddings: bool = True):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie_word_embeddings,
    )
    return transformers.GPT2LMHeadModel(config)


def lm_data(n: int = 16) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row} for row in ids]


def hf_args(out: Path, **kwargs):
    return transformers.TrainingArguments(
        str(out), per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True, **kwargs,
    )


def train_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_hf_trainer_adds_the_term_once_per_optimizer_step_with_gradient_accumulation(tmp_path):
    pytest.importorskip("transformers")
    args = dict(max_steps=3, gradient_accumulation_steps=2, save_strategy="no")
    base = transformers.Trainer(model=gpt2(), args=hf_args(tmp_path / "base", **args), train_dataset=lm_data())
    base.train()
    model = gpt2()
    reg = anm.attach(model, alpha=1.0, lam=1.0, warmup=WARMUP)  # GPT-2's init norms are ≈ 0.05 < α

    class Recording(ANMTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                self.seen.append(self.state.global_step)  # the step ANMTrainer passes to reg.loss
            return super().compute_loss(model, inputs, *args, **kwargs)

    trainer = Recording(model=model, args=hf_args(tmp_path / "anm", **args), train_dataset=lm_data(), anm_reg=reg)
    trainer.seen = []
    trainer.train()

    assert trainer.seen == [0, 0, 1, 1, 2, 2]  # optimizer steps, the same for both micro-batches of a step
    logs, base_logs = train_logs(trainer), train_logs(base)
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    for entry in logs:  # logged after optimizer step `step`, whose micro-batches used step - 1
        assert entry["anm/weight"] == weight(entry["step"] - 1)
        assert {"anm/loss", "anm/norm/transformer.h.0", "anm/norm/transformer.h.1"} <= entry.keys()
    # Step 1 has warm-up weight 0, so both runs still have the same weights at step 2: their losses differ by
    # the ANM term exactly once (not once per micro-batch).
    assert logs[0]["loss"] == pytest.approx(base_logs[0]["loss"], abs=2e-4)
    assert logs[1]["anm/loss"] > 0
    assert logs[1]["loss"] - base_logs[1]["loss"] == pytest.approx(logs[1]["anm/loss"], abs=1e-3)
    # The hooks stay on the model Trainer trained: the term alone has a gradient in every block.
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=torch.stack([row["input_ids"] for row in lm_data(2)]))
    reg.loss(step=WARMUP).backward()
    for block in model.transformer.h:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.mlp.parameters())
    reg.detach()


if transformers is not None:

    class WrapperTrainer(transformers.Trainer):
        """Trainer holding an anm.ANM wrapper: the term comes from the model it is given."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            if model.training:
                loss = loss + model.loss(step=self.state.global_step)
            return (loss, outputs) if return_outputs else loss


def test_hf_trainer_keeps_the_columns_of_a_model_wrapped_with_anm(tmp_path):
    # Trainer keeps only the dataset columns that model.forward names; the wrapper shows its model's
    # signature, so input_ids and labels reach GPT-2 (with *args, **kwargs: "The batch received was empty").
    pytest.importorskip("transformers")
    # Untied: Trainer could not checkpoint a wrapper of tied weights, and refuses it (test below).
    model = anm.ANM(gpt2(tie_word_embeddings=False), alpha=1.0, lam=1.0, warmup=WARMUP)  # init norms ≈ 0.05 < α
    args = hf_args(tmp_path, max_steps=3, save_strategy="no")
    trainer = WrapperTrainer(model=model, args=args, train_dataset=lm_data())
    trainer.train()
    assert {"input_ids", "labels"} <= set(trainer._signature_columns)
    assert [entry["step"] for entry in train_logs(trainer)] == [1, 2, 3]
    stats = model.stats()
    assert stats["anm/weight"] == weight(2) and stats["anm/loss"] > 0
    assert {"anm/norm/transformer.h.0", "anm/norm/transformer.h.1"} <= stats.keys()
    model.close()


def test_hf_trainer_refuses_a_wrapper_of_tied_weights_before_training_and_attach_saves_them(tmp_path):
    # Trainer saves what is not a PreTrainedModel with safetensors.save_file, which refuses tied weights
    # ("Some tensors share memory"): the run used to train and then crash at its first checkpoint.
    pytest.importorskip("transformers")
    model = gpt2()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    wrapped = anm.ANM(model, alpha=1.0, lam=1.0, warmup=WARMUP)
    args = hf_args(tmp_path / "wrapped", max_steps=2, save_steps=1)
    with pytest.raises(anm.ANMError, match=r"tied.*anm\.attach"):
        WrapperTrainer(model=wrapped, args=args, train_dataset=lm_data())
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())  # no step ran
    assert not list((tmp_path / "wrapped").glob("checkpoint-*"))
    wrapped.close()

    # The fix the error names: the hooks on the model itself, which Trainer saves with save_pretrained.
    reg = anm.attach(model, alpha=1.0, lam=1.0, warmup=WARMUP)
    trainer = ANMTrainer(model=model, args=hf_args(tmp_path / "run", max_steps=2, save_steps=1),
                         train_dataset=lm_data(), anm_reg=reg)
    trainer.train()
    for step in (1, 2):
        saved = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "run" / f"checkpoint-{step}"))
        assert saved.lm_head.weight is saved.transformer.wte.weight  # still tied after the reload
    assert_same_weights(saved, model)
    reg.detach()


def test_hf_trainer_checkpoints_a_wrapper_of_untied_weights_that_reload(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    model = gpt2(tie_word_embeddings=False)
    wrapped = anm.ANM(model, alpha=1.0, lam=1.0, warmup=WARMUP)
    trainer = WrapperTrainer(model=wrapped, args=hf_args(tmp_path, max_steps=2, save_steps=1), train_dataset=lm_data())
    trainer.train()
    fresh = gpt2(seed=1, tie_word_embeddings=False)
    fresh.load_state_dict(load_file(str(tmp_path / "checkpoint-2" / "model.safetensors")))  # the model's own keys
    assert_same_weights(fresh, model)
    wrapped.close()


@pytest.mark.orders
def test_hf_trainer_checkpoint_resume_and_save_pretrained(tmp_path):
    pytest.importorskip("transformers")
    data = lm_data()
    model = gpt2()
    reg = anm.attach(model, alpha=1.0, lam=1.0, warmup=WARMUP)
    trainer = ANMTrainer(model=model, args=hf_args(tmp_path / "run", max_steps=4, save_steps=2), train_dataset=data,
                         anm_reg=reg)
    trainer.train()
    assert type(model) is transformers.GPT2LMHeadModel  # still the user's own model object
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists()

    trainer.save_model(str(tmp_path / "final"))
    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "final"))
    assert_same_weights(loaded, model)
    assert_same_weights(transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "run" / "checkpoint-4")), model)

    # Resume into a fresh model (other init: the checkpoint must supply the weights) and regulariser: the
    # warm-up continues from Trainer's restored global_step, and the run ends where the uninterrupted one did.
    fresh = gpt2(seed=1)
    reg2 = anm.attach(fresh, alpha=1.0, lam=1.0, warmup=WARMUP)
    resumed = ANMTrainer(model=fresh, args=hf_args(tmp_path / "resumed", max_steps=4, save_steps=2),
                         train_dataset=data, anm_reg=reg2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    after = {entry["step"]: entry for entry in train_logs(resumed)}  # steps 1-2 come from the checkpoint
    full = {entry["step"]: entry for entry in train_logs(trainer)}
    assert sorted(after) == [1, 2, 3, 4]
    for step in (3, 4):
        assert after[step]["anm/weight"] == weight(step - 1)
        assert after[step]["loss"] == pytest.approx(full[step]["loss"], abs=1e-5)
    assert_same_weights(fresh, model, atol=1e-6)
    reg.detach()
    reg2.detach()


# == Lightning ==========================================================================================
if L is not None:

    class LitANM(L.LightningModule):
        """LightningModule training `model` (tokens -> tokens, MSE) with the ANM term of anm.attach."""

        def __init__(self, model, lr=1e-3, **anm_options):
            super().__init__()
            self.model = model  # your own model: its state_dict, and so the checkpoint's, are unchanged
            self.reg = anm.attach(model, **anm_options)  # hooks on its transformer blocks
            self.lr = lr

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self.model(x), y)
            loss = loss + self.reg.loss(step=self.global_step)  # optimizer steps taken so far
            self.log_dict(self.reg.stats())  # anm/loss, anm/weight, anm/norm/<layer>, ...
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.lr)

        def on_save_checkpoint(self, checkpoint):
            checkpoint["anm"] = self.reg.state_dict()  # the warm-up position

        def on_load_checkpoint(self, checkpoint):
            self.reg.load_state_dict(checkpoint["anm"])


def lightning_run(tmp_path: Path, model: nn.Module, max_steps: int, ckpt_path: str | None = None):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    class Recording(LitANM):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.seen.append((self.global_step, self.reg.stats()["anm/weight"]))
            return loss

        def on_load_checkpoint(self, checkpoint):
            super().on_load_checkpoint(checkpoint)
            self.loaded = (checkpoint["anm"], self.reg.state_dict())

    lit = Recording(model, alpha=8.0, lam=1.0, warmup=WARMUP)
    lit.seen = []
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, accumulate_grad_batches=2, log_every_n_steps=1,
        logger=CSVLogger(tmp_path / "logs"), enable_checkpointing=True, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)],
    )
    # 8 equal micro-batches = 4 optimizer steps in one epoch. Equal, because on a mid-epoch resume Lightning
    # restarts a plain DataLoader from its first batch: the resumed run still sees the same data.
    x, y = token_data(4).tensors
    repeated = torch.utils.data.TensorDataset(x.repeat(8, 1, 1), y.repeat(8, 1, 1))
    loader = torch.utils.data.DataLoader(repeated, batch_size=4)
    trainer.fit(lit, loader, ckpt_path=ckpt_path)
    return lit, trainer


@pytest.mark.filterwarnings("ignore:The dirpath has changed", "ignore:You're resuming from a checkpoint that ended")
@pytest.mark.orders
def test_lightning_accumulation_logging_checkpoint_and_resume(tmp_path):
    pytest.importorskip("lightning")
    model = tiny_transformer()
    lit, trainer = lightning_run(tmp_path / "full", model, max_steps=4)
    assert trainer.global_step == 4
    # accumulate_grad_batches=2: both micro-batches of an optimizer step see the same global_step.
    assert lit.seen == [(s, weight(s)) for s in (0, 0, 1, 1, 2, 2, 3, 3)]
    assert lit.reg.stats()["anm/loss"] > 0
    assert {"anm/loss", "anm/weight", "anm/norm/1.layers.0", "anm/norm/1.layers.1"} <= trainer.logged_metrics.keys()
    rows = list(csv.DictReader(open(tmp_path / "full" / "logs" / "lightning_logs" / "version_0" / "metrics.csv")))
    assert any(row.get("anm/loss") for row in rows) and any(row.get("anm/weight") for row in rows)

    ckpt = tmp_path / "full" / "ckpt" / "epoch=0-step=2.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["anm"] == {"step": 2}  # the warm-up position after 2 optimizer steps
    assert set(saved["state_dict"]) == {f"model.{key}" for key in model.state_dict()}  # no extra keys

    resumed, trainer2 = lightning_run(tmp_path / "resumed", tiny_transformer(seed=1), max_steps=4, ckpt_path=str(ckpt))
    assert resumed.loaded == ({"step": 2}, {"step": 2})  # on_load_checkpoint restored the warm-up position
    assert resumed.seen == [(s, weight(s)) for s in (2, 2, 3, 3)]
    assert resumed.reg.state_dict() == lit.reg.state_dict()
    assert_same_weights(resumed.model, model, atol=1e-6)
    lit.reg.detach()
    resumed.reg.detach()


# == accelerate =========================================================================================
def accelerate_run(grad_accum: int, steps: int, save_at: int | None = None, out: Path | None = None,
                   load: Path | None = None, seed: int = 0):
    """`steps` optimizer steps of `grad_accum` micro-batches each, step-less reg.loss(); returns the model, the
    regulariser and the warm-up weight each micro-batch used. With `load`, resume from that save_state."""
    from accelerate import Accelerator

    model = tiny_transformer(seed)
    reg = anm.attach(model, alpha=8.0, lam=1.0, warmup=WARMUP)  # before prepare(), like the recipe
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(token_data(4 * grad_accum * steps), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(reg)  # save_state / load_state carry the warm-up position
    if load is not None:
        accelerator.load_state(str(load))
        loader = accelerator.skip_first_batches(loader, reg.state_dict()["step"] * grad_accum)
    seen = []
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x), y) + reg.loss()  # no step=: counts real optimizer steps
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        seen.append(reg.stats()["anm/weight"])
        if save_at is not None and accelerator.sync_gradients and len(seen) == save_at * grad_accum:
            accelerator.save_state(str(out))
    return accelerator.unwrap_model(model), reg, seen


def test_accelerate_stepless_warmup_counts_optimizer_steps_not_micro_batches():
    pytest.importorskip("accelerate")
    _, reg4, accumulated = accelerate_run(grad_accum=4, steps=3)
    _, reg1, plain = accelerate_run(grad_accum=1, steps=3)
    assert plain == [weight(s) for s in range(3)]
    assert accumulated == [weight(s) for s in range(3) for _ in range(4)]  # same weight at optimizer step s
    assert reg4.state_dict() == reg1.state_dict() == {"step": 3}
    reg4.detach()
    reg1.detach()


@pytest.mark.orders
def test_accelerate_save_state_and_load_state_resume(tmp_path):
    pytest.importorskip("accelerate")
    model, reg, full = accelerate_run(grad_accum=2, steps=4, save_at=2, out=tmp_path / "state")
    assert full == [weight(s) for s in (0, 0, 1, 1, 2, 2, 3, 3)]
    resumed_model, resumed_reg, rest = accelerate_run(grad_accum=2, steps=4, load=tmp_path / "state", seed=1)
    assert rest == [weight(s) for s in (2, 2, 3, 3)]  # the warm-up continues where it was saved
    assert resumed_reg.state_dict() == reg.state_dict() == {"step": 4}
    assert_same_weights(resumed_model, model, atol=1e-6)
    reg.detach()
    resumed_reg.detach()


# == plain PyTorch, and the docs ========================================================================
@pytest.mark.orders
def test_plain_loop_with_gradient_accumulation_equals_one_big_batch():
    # The docs' plain-loop recipe: 2 micro-batches with step=opt_step and loss / accum give the gradient of one
    # batch of both (equal-sized micro-batches, per-token mean).
    x, y = token_data(8).tensors
    grads = []
    for chunks in (1, 2):
        model = tiny_transformer()
        with anm.attach(model, alpha=8.0, lam=1.0, warmup=WARMUP) as reg:
            for xs, ys in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
                loss = nn.functional.mse_loss(model(xs), ys) + reg.loss(step=3)
                (loss / chunks).backward()
            assert reg.stats()["anm/weight"] == weight(3)
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert_same_sums(a, b)  # two chunks sum in another order (tests/numerics.py)


@pytest.mark.parametrize("name", ["ANMTrainer", "LitANM"])
def test_recipe_classes_are_the_ones_in_the_docs(name):
    recipe = globals().get(name)
    if recipe is None:
        pytest.skip(f"{name} needs {'transformers' if name == 'ANMTrainer' else 'lightning'}")
    assert textwrap.dedent(inspect.getsource(recipe)) in DOC.read_text(), f"docs/integrations.md's {name} differs"


def test_accelerate_mixed_precision_prepares_and_unwraps_the_anm_wrapper():
    # accelerate re-binds model.forward.__func__ for autocast, and again on unwrap_model: the wrapper's
    # forward (which carries the model's signature) must re-bind as a method does.
    accelerate = pytest.importorskip("accelerate")
    wrapped = anm.ANM(tiny_transformer(), alpha=1e3, lam=1.0, warmup=0)  # α above every norm: a term > 0
    x = token_data()[:4][0]
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)  # one state per process
    try:
        accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
        prepared = accelerator.prepare(wrapped)
        assert prepared(x).dtype == torch.float32 and wrapped.loss().item() > 0
        unwrapped = accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
        assert unwrapped is wrapped
        torch.testing.assert_close(unwrapped(x), wrapped.model(x))
        assert wrapped.loss().item() > 0
    finally:
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
        wrapped.close()
