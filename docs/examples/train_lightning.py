"""Lightning: BioCallback, with accumulation, clipping and bf16 mixed precision."""

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bio_transformations import BioConverter
from bio_transformations.integrations.lightning import BioCallback


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        # the converted network may sit anywhere inside the LightningModule
        self.net = BioConverter(fuzzy_learning_rate_factor_nu=0.16)(
            nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


data = DataLoader(TensorDataset(torch.randn(64, 10), torch.randn(64, 2)), batch_size=8)
module = Regressor()
trainer = pl.Trainer(
    accelerator="cpu",
    max_epochs=1,
    accumulate_grad_batches=2,
    gradient_clip_val=1.0,
    precision="bf16-mixed",
    callbacks=[BioCallback(rejuvenate_every=2)],
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)
trainer.fit(module, data)
print("optimizer steps:", module.net[0].bio_mod.optimizer_steps)  # 8 batches / 2 = 4
