"""The framework integrations against the real packages, on CPU: Lightning's and Hugging Face's
``BioCallback`` and ``attach()`` under Accelerate equal the hand-written loop bit for bit
(accumulation, clipping, resuming from the framework's own checkpoints)."""

from __future__ import annotations

import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from bio_loops import assert_same_state, batches, bio_after_step, bio_before_step, make_net
from torch.utils.data import DataLoader, Dataset, TensorDataset

from bio_transformations import attach

LR = 0.05


def hand_loop(
    net, data, *, accumulate=1, clip=None, rejuvenate_every=0, momentum=0.9, autocast=False
):
    """Forward, ``loss/accumulate`` backward per micro-batch, clip, the bio methods, step."""
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=momentum)
    for step in range(1, len(data) // accumulate + 1):
        opt.zero_grad()
        for x, y in data[(step - 1) * accumulate : step * accumulate]:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.mse_loss(net(x), y)
            (loss / accumulate).backward()
        if clip:
            nn.utils.clip_grad_norm_(net.parameters(), clip)
        bio_before_step(net)
        opt.step()
        bio_after_step(net, step, rejuvenate_every, True)
    return opt


def loader(data):
    xs, ys = zip(*data)
    return DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=len(xs[0]))


# -- Lightning -------------------------------------------------------------------------------

pl = pytest.importorskip("lightning.pytorch")
from bio_transformations.integrations.lightning import BioCallback as LightningBio  # noqa: E402


class LitNet(pl.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net  # the converted network is an attribute: the callback finds it

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


def lightning_fit(net, data, ckpt_path=None, rejuvenate_every=2, **trainer_options):
    options = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, max_epochs=1,
    )  # fmt: skip
    options.update(trainer_options)
    callback = LightningBio(rejuvenate_every=rejuvenate_every)
    trainer = pl.Trainer(callbacks=[callback], **options)
    trainer.fit(LitNet(net), loader(data), ckpt_path=ckpt_path)
    assert not callback.handles  # detached when training ended
    return trainer


@pytest.mark.parametrize("accumulate,clip", [(1, None), (2, None), (2, 0.05)])
def test_lightning_equals_the_hand_written_loop(accumulate, clip):
    data = batches(8)
    ref, got = make_net(), make_net()
    hand_loop(ref, data, accumulate=accumulate, clip=clip, rejuvenate_every=2)
    lightning_fit(got, data, accumulate_grad_batches=accumulate, gradient_clip_val=clip)
    assert_same_state(ref, got)
    assert got[0].bio_mod.optimizer_steps == len(data) // accumulate


def test_lightning_bf16_mixed_equals_the_autocast_loop():
    data = batches(4)
    ref, got = make_net(), make_net()
    hand_loop(ref, data, accumulate=2, clip=0.05, rejuvenate_every=2, autocast=True)
    lightning_fit(
        got, data, precision="bf16-mixed", accumulate_grad_batches=2, gradient_clip_val=0.05
    )
    assert_same_state(ref, got)


def test_lightning_resume_keeps_the_cadence(tmp_path):
    data = batches(3)  # one epoch is 3 steps; rejuvenation after step 4 falls in the second
    ref = make_net()
    lightning_fit(ref, data, max_epochs=2, rejuvenate_every=4)
    first = make_net()
    trainer = lightning_fit(first, data, max_epochs=1, rejuvenate_every=4)
    path = tmp_path / "first.ckpt"
    trainer.save_checkpoint(path)
    resumed = make_net(seed=7)  # everything comes from the checkpoint
    lightning_fit(resumed, data, ckpt_path=str(path), max_epochs=2, rejuvenate_every=4)
    assert resumed[0].bio_mod.optimizer_steps == 6
    assert_same_state(ref, resumed, optimizer_steps=True)
    # the cadence matters: a count restarted at 0 would not rejuvenate within the second run,
    # and a run without rejuvenation ends elsewhere
    unrejuvenated = make_net()
    lightning_fit(unrejuvenated, data, max_epochs=2, rejuvenate_every=0)
    assert not torch.equal(unrejuvenated[0].weight, ref[0].weight)


def test_lightning_model_argument_narrows_the_search():
    data = batches(2)
    got, other = make_net(), make_net(seed=3)

    class TwoNets(LitNet):
        def __init__(self):
            super().__init__(got)
            self.other = other  # converted too, trained too, but not attached

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x) + self.other(x), y)

    before = other[0].bio_mod.fuzzy_learning_rate_parameters.clone()
    callback = LightningBio(model=got)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, max_epochs=1, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(TwoNets(), loader(data))
    assert got[0].bio_mod.optimizer_steps == 2 and other[0].bio_mod.optimizer_steps == 0
    assert torch.equal(other[0].bio_mod.fuzzy_learning_rate_parameters, before)


# -- Hugging Face Trainer ----------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from bio_transformations.integrations.transformers import BioCallback as HFBio  # noqa: E402


class Wrapped(nn.Module):
    """A plain torch network as the Trainer expects a model: keyword inputs, a loss output."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, labels):
        out = self.net(x)
        return {"loss": F.mse_loss(out, labels), "logits": out}


class Rows(Dataset):
    def __init__(self, data):
        self.rows = [{"x": x[i], "labels": y[i]} for x, y in data for i in range(len(x))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class InOrderTrainer(transformers.Trainer):
    """The real Trainer, reading the data in order so a hand-written loop can follow it."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def hf_train(net, data, out_dir, *, resume=None, max_steps, rejuvenate_every=2, **args):
    options = dict(
        output_dir=str(out_dir), per_device_train_batch_size=len(data[0][0]), max_steps=max_steps,
        learning_rate=LR, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    options.update(args)
    callback = HFBio(rejuvenate_every=rejuvenate_every)
    trainer = InOrderTrainer(
        model=Wrapped(net),
        args=transformers.TrainingArguments(**options),
        train_dataset=Rows(data),
        callbacks=[callback],
    )
    trainer.train(resume_from_checkpoint=resume)
    assert not callback.handles
    return trainer


@pytest.mark.parametrize("accumulate", [1, 2])
def test_hugging_face_equals_the_hand_written_loop(tmp_path, accumulate):
    data = batches(8)
    ref, got = make_net(), make_net()
    hand_loop(ref, data, accumulate=accumulate, rejuvenate_every=2, momentum=0.0)
    hf_train(got, data, tmp_path, max_steps=8 // accumulate, gradient_accumulation_steps=accumulate)
    assert_same_state(ref, got)
    assert got[0].bio_mod.optimizer_steps == 8 // accumulate


def test_hugging_face_with_clipping_runs_after_the_clip(tmp_path):
    data = batches(4)
    ref, got = make_net(), make_net()
    hand_loop(ref, data, accumulate=2, clip=0.05, rejuvenate_every=2, momentum=0.0)
    hf_train(got, data, tmp_path, max_steps=2, gradient_accumulation_steps=2, max_grad_norm=0.05)
    # the Trainer's clip (Accelerate's clip_grad_norm_) computes the norm like torch's, so the
    # run matches the hand-written loop here; the requirement is that it runs and clips first
    assert got[0].bio_mod.optimizer_steps == 2
    assert_same_state(ref, got)


def test_hugging_face_resume_from_a_safetensors_checkpoint(tmp_path):
    data = batches(8)
    ref = make_net()
    hf_train(
        ref, data, tmp_path / "ref", max_steps=4, gradient_accumulation_steps=2, rejuvenate_every=3
    )
    first = make_net()
    hf_train(
        first, data, tmp_path / "run", max_steps=2, gradient_accumulation_steps=2,
        rejuvenate_every=3, save_strategy="steps", save_steps=2,
    )  # fmt: skip
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists()  # the state dict saved as safetensors
    resumed = make_net(seed=11)
    hf_train(
        resumed, data, tmp_path / "run", resume=str(checkpoint), max_steps=4,
        gradient_accumulation_steps=2, rejuvenate_every=3,
    )  # fmt: skip
    assert resumed[0].bio_mod.optimizer_steps == 4
    assert_same_state(ref, resumed, optimizer_steps=True)


# -- Accelerate --------------------------------------------------------------------------------

accelerate = pytest.importorskip("accelerate")


def test_attach_on_an_accelerate_prepared_optimizer():
    from accelerate.state import AcceleratorState, GradientState

    data = batches(8)
    ref, got = make_net(), make_net()
    hand_loop(ref, data, accumulate=2, clip=0.05, rejuvenate_every=2)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    try:
        opt = torch.optim.SGD(got.parameters(), lr=LR, momentum=0.9)
        model, opt, dl = accelerator.prepare(got, opt, loader(data))
        with attach(got, opt, rejuvenate_every=2):  # the wrapped optimizer
            for x, y in dl:
                with accelerator.accumulate(model):
                    accelerator.backward(F.mse_loss(model(x), y))  # divides by 2 itself
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), 0.05)
                    opt.step()  # a no-op between accumulation boundaries
                    opt.zero_grad()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert got[0].bio_mod.optimizer_steps == 4
    assert_same_state(ref, got)


# -- imports -----------------------------------------------------------------------------------


def test_the_library_imports_without_the_frameworks():
    script = textwrap.dedent(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("lightning", "transformers", "pytorch_lightning"):
                    raise ImportError(f"No module named {name!r} (blocked)")

        sys.meta_path.insert(0, Block())
        import bio_transformations
        from bio_transformations import attach
        for extra in ("lightning", "transformers"):
            try:
                __import__(f"bio_transformations.integrations.{extra}")
            except ImportError as exc:
                assert f"bio-transformations[{extra}]" in str(exc), exc
                print("ok", extra)
            else:
                raise SystemExit(f"{extra} imported")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "lightning", "ok", "transformers"]


# -- the docs' examples ------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


@pytest.mark.parametrize("name", ["train_accelerate", "train_lightning", "train_hugging_face"])
def test_the_docs_examples_run(name, capsys):
    from accelerate.state import AcceleratorState, GradientState

    try:
        runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert "optimizer steps: 4" in capsys.readouterr().out
