"""Lightning: ``SyncBatchNormPlugin``, syncbn's layers in a ``Trainer``. Imports lightning.

    from syncbn.integrations.lightning import SyncBatchNormPlugin

    trainer = lightning.pytorch.Trainer(strategy="ddp", devices=2, plugins=[SyncBatchNormPlugin()])

In place of ``Trainer(sync_batchnorm=True)``, whose ``torch.nn.SyncBatchNorm`` trains on GPUs
only (Lightning rejects the two together). The strategy applies the plugin before it wraps
the model in DDP, when fitting, and reverts it when fitting ends, so the LightningModule
holds its original BatchNorm classes again afterwards.
"""

from __future__ import annotations

from lightning.pytorch.plugins import LayerSync
from torch import nn

from ..convert import convert_sync_batchnorm, revert_sync_batchnorm


class SyncBatchNormPlugin(LayerSync):
    """Lightning ``LayerSync`` plugin: every BatchNorm of the model synchronized by syncbn.

    ``apply`` is ``syncbn.convert_sync_batchnorm`` over the whole world, ``revert`` is
    ``syncbn.revert_sync_batchnorm``; both keep the model's Parameter and buffer objects. It
    works with Lightning's DDP strategies on CPU processes (gloo) and on GPUs (NCCL).
    """

    def apply(self, model: nn.Module) -> nn.Module:
        return convert_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        return revert_sync_batchnorm(model)
