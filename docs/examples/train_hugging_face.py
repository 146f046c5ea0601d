"""Hugging Face Trainer: BioCallback, with accumulation, clipping and safetensors checkpoints."""

import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from bio_transformations import BioConverter
from bio_transformations.integrations.transformers import BioCallback


class Regressor(nn.Module):
    """A plain torch network as the Trainer expects a model: keyword inputs, a loss output."""

    def __init__(self):
        super().__init__()
        self.net = BioConverter(fuzzy_learning_rate_factor_nu=0.16)(
            nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
        )

    def forward(self, x, labels):
        out = self.net(x)
        return {"loss": F.mse_loss(out, labels), "logits": out}


rows = [{"x": torch.randn(10), "labels": torch.randn(2)} for _ in range(64)]
model = Regressor()
with tempfile.TemporaryDirectory() as out_dir:
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
        num_train_epochs=1,
        learning_rate=0.05,
        optim="sgd",
        save_strategy="epoch",  # model.safetensors: the bio state is tensors only
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, callbacks=[BioCallback(rejuvenate_every=2)]
    )
    trainer.train()
print("optimizer steps:", model.net[0].bio_mod.optimizer_steps)  # 8 batches / 2 = 4
