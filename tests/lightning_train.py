"""A Lightning ``Trainer`` with syncbn's plugin, for tests/test_lightning.py (and test_cuda.py).

    python tests/lightning_train.py OUT_PREFIX [--accelerator cpu] [--devices 2]

DDP over ``--devices`` processes, float64, two SGD steps of 3 samples per rank of a small
conv net with BatchNorm2d and BatchNorm1d. Each rank writes ``OUT_PREFIX.rank<r>.pt``: the
BatchNorm classes during and after fitting and the final state_dict. ``reference`` trains the
same net in one process on the global batches (lightning is imported only by ``main``, so the
test computes the reference without it).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

STEPS = 2
BATCH = 3  # samples per rank and step
LR = 0.1


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8, momentum=None),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
        nn.BatchNorm1d(4),
    ).double()


def make_data(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    n = STEPS * BATCH * world
    return torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64) * 2 + 1, torch.randn(
        n, 4, generator=gen, dtype=torch.float64
    )


def reference(world: int) -> dict[str, torch.Tensor]:
    """One process, plain BatchNorm, the global batch of each step: what the ranks must end with.

    Each rank draws its batches through a shuffling ``DistributedSampler`` (``main``); step s's
    global batch is every rank's s-th batch. With the same number of samples per rank, DDP's
    average of the ranks' mean losses is the mean loss over the global batch.
    """
    net = make_net()
    x, y = make_data(world)
    dealt = [
        list(torch.utils.data.DistributedSampler(range(len(x)), num_replicas=world, rank=rank, shuffle=True, seed=0))
        for rank in range(world)
    ]
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for step in range(STEPS):
        batch = [i for indices in dealt for i in indices[step * BATCH : (step + 1) * BATCH]]
        opt.zero_grad()
        nn.functional.mse_loss(net(x[batch]), y[batch]).backward()
        opt.step()
    return net.state_dict()


def _batchnorm_classes(net: nn.Module) -> list[str]:
    return [type(m).__name__ for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def main() -> None:
    import lightning.pytorch as pl

    from syncbn.integrations.lightning import SyncBatchNormPlugin

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_prefix")
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--devices", type=int, default=2)
    args = ap.parse_args()

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()
            self.classes_in_fit: list[str] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.classes_in_fit = _batchnorm_classes(self.net)
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

        def train_dataloader(self):
            # Called once the process group exists: the sampler finds the world and its rank.
            data = torch.utils.data.TensorDataset(*make_data(args.devices))
            sampler = torch.utils.data.DistributedSampler(data, shuffle=True, seed=0)
            return torch.utils.data.DataLoader(data, batch_size=BATCH, sampler=sampler)

    module = Module()
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy="ddp",
        plugins=[SyncBatchNormPlugin()],
        precision="64-true",
        max_epochs=1,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    result = {
        "classes_in_fit": module.classes_in_fit,
        "classes_after": _batchnorm_classes(module.net),
        "steps": trainer.global_step,
        "state": {k: v.cpu() for k, v in module.net.state_dict().items()},
    }
    path = f"{args.out_prefix}.rank{trainer.global_rank}.pt"
    torch.save(result, path)
    print(f"rank {trainer.global_rank}: {trainer.global_step} steps, wrote {path}")


if __name__ == "__main__":
    main()
