"""timm's BatchNorm + activation layers <-> ``syncbn.SyncBatchNormAct``.

``convert_sync_batchnorm`` calls these through its built-in table (``syncbn.convert``) for
``BatchNormAct2d`` and ``SyncBatchNormAct`` of ``timm.layers.norm_act`` (timm < 0.9:
``timm.models.layers.norm_act``). timm is never imported here: a timm layer exists only once
timm is, and its classes are read from ``sys.modules``.
"""

from __future__ import annotations

import sys

from torch import nn

from .. import activations
from ..nn import SyncBatchNormAct

NORM_ACT_MODULES = ("timm.layers.norm_act", "timm.models.layers.norm_act")


def to_sync(layer: nn.Module) -> SyncBatchNormAct:
    """The synchronized layer for timm's ``BatchNormAct2d`` or ``SyncBatchNormAct``.

    Conversion then gives it the layer's tensors, flags and its ``drop`` and ``act`` children.
    An ``act`` the activation table knows becomes the layer's ``activation``; any other stays a
    module that runs after the normalization.
    """
    act = layer._modules.get("act")
    known = ("identity", None) if act is None else activations.from_module(act)
    activation, param = known if known is not None else ("identity", None)
    new = SyncBatchNormAct(layer.num_features, activation=activation, activation_param=param, device="meta")
    new.apply_act_module = known is None
    return new


def to_batchnorm_act2d(layer: nn.Module) -> nn.Module:
    """timm's ``BatchNormAct2d`` for a layer converted from timm's ``SyncBatchNormAct``.

    Built without activation or dropout (``nn.Identity``); conversion then puts in the layer's
    own ``drop`` and ``act`` children (timm's SyncBatchNormAct may lack them) and tensors.
    """
    batchnorm_act2d = sys.modules[layer.converted_from.__module__].BatchNormAct2d  # beside SyncBatchNormAct
    return batchnorm_act2d(layer.num_features, apply_act=False, device="meta")
