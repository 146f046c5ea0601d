"""attach() on an optimizer prepared by Accelerate, with gradient accumulation and clipping."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from bio_transformations import BioConverter, attach

net = BioConverter(fuzzy_learning_rate_factor_nu=0.16)(
    nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
)
data = DataLoader(TensorDataset(torch.randn(64, 10), torch.randn(64, 2)), batch_size=8)
accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
model, optimizer, data = accelerator.prepare(net, optimizer, data)

with attach(net, optimizer, rejuvenate_every=2):  # the prepared (wrapped) optimizer
    for x, y in data:
        with accelerator.accumulate(model):
            accelerator.backward(F.mse_loss(model(x), y))
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()  # steps (and runs the mechanisms) every 2nd batch only
            optimizer.zero_grad()

print("optimizer steps:", net[0].bio_mod.optimizer_steps)  # 8 batches / 2 = 4
