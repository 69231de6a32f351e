"""Model tools: convert BatchNorm layers to ``syncbn.SyncBatchNorm`` and back, freeze them.

    model = syncbn.convert_sync_batchnorm(model)         # before DDP, after building the optimizer is fine
    model = syncbn.freeze_batchnorm(model)               # fine-tuning: BN stays in eval mode for good
    plain = syncbn.revert_sync_batchnorm(model)          # export / single-device inference

Conversion and reversion move the *same* Parameter and buffer objects into the new layer, so an
optimizer, an EMA copy's references or a ``requires_grad`` setting made before conversion still
apply, and no memory is copied. The layer's flags (training, eps, momentum, affine,
track_running_stats), its freezing and any plain attributes model code set on it (``qconfig``,
weight-decay tags) travel with it; hooks registered on the BatchNorm layer itself do not (as in
``torch.nn.SyncBatchNorm.convert_sync_batchnorm``). A layer used at several places in a model
becomes one new layer used at the same places.

Which layers convert, into what and back into what, is one table of BatchNorm classes
(``_REGISTRY``): torch's classes, those of optional libraries (timm, mmengine, mmcv; entered
once their module is imported, never imported here) and what ``register_batchnorm_class`` adds.

Freezing is configuration, not state: a frozen layer's ``state_dict`` has exactly the keys of an
unfrozen one (and of ``nn.BatchNorm2d``), loading a state_dict neither freezes nor unfreezes,
and the freezing itself travels with the module object through ``copy.deepcopy``, ``pickle``,
``torch.save(model)`` / ``torch.load(..., weights_only=False)``, conversion and reversion.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from .integrations import timm as _timm
from .nn import BatchNormXd, SyncBatchNorm, SyncBatchNormAct

__all__ = [
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
    "register_batchnorm_class",
    "freeze_batchnorm",
    "unfreeze_batchnorm",
    "is_frozen",
]

# nn.BatchNorm{1,2,3}d <-> the dimensionality syncbn.SyncBatchNorm.batchnorm_dim records.
_BATCHNORM_CLASSES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
#: Input rank -> the single-process nn.BatchNormNd that accepts it.
BATCHNORM_BY_INPUT_DIM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
# The configuration every BatchNorm layer has, carried from each layer to its replacement.
_BATCHNORM_FIELDS = ("num_features", "eps", "momentum", "affine", "track_running_stats")
# Instance attributes not carried to the new layer: the frozen ``train`` is rebuilt for the new
# object (and conversion skips layers with an instance ``forward``); reverting also leaves
# behind what belongs to syncbn's layers.
_NOT_CARRIED = frozenset({"train", "forward"})
_SYNCBN_OWN = _NOT_CARRIED | {
    "process_group",
    "converted_from",
    "batchnorm_dim",
    "_input_dim",
    "_syncbn_name",
    "activation",
    "activation_param",
    "inplace",
    "_act_spec",
    "apply_act_module",
}


# ---------------------------------------------------------------------------------------------
# Freezing


class _FrozenTrain:
    """The ``train`` method of a frozen BatchNorm layer: the layer stays in eval mode.

    ``freeze_batchnorm`` stores one of these as the *instance* attribute ``train`` of each
    BatchNorm layer. Normal attribute lookup finds it before the class's ``nn.Module.train``, so
    ``model.train()`` (which calls ``child.train(mode)`` on every child) and ``layer.eval()``
    both land here, and the layer's ``training`` flag stays False: no batch statistics, no
    running-statistics update, no collective.

    Why this and not the alternatives:

    - swapping the layer's class for a frozen subclass would change ``type(layer)``, which
      exact-type tables (quantization fusion, export passes, revert's own contract of giving
      back ``nn.BatchNorm2d``) rely on;
    - a forward pre-hook could only flip ``training`` back at the next forward, so after
      ``model.train()`` the flag would read True and anything inspecting it would be misled;
    - patching ``_BatchNorm.train`` would change torch for every model in the process.

    An instance attribute is plain data in the module's ``__dict__``: it is not part of the
    ``state_dict``, and ``copy.deepcopy``, ``pickle`` and ``torch.save`` of the whole model carry
    it, with ``module`` pointing at the copied layer (both memoize the layer before its
    attributes). The class is module-level so that pickles can find it.

    ``requires_grad`` remembers, per parameter name, the flag each parameter had before the
    layer was first frozen, for ``unfreeze_batchnorm`` to restore.
    """

    def __init__(self, module: nn.Module, requires_grad: dict[str, bool]) -> None:
        self.module = module
        self.requires_grad = requires_grad

    def __call__(self, mode: bool = True) -> nn.Module:
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        module = self.module
        module.training = False
        # A BatchNorm+activation layer's own children (activation, dropout) follow the model.
        for child in module.children():
            child.train(mode)
        return module

    def __repr__(self) -> str:
        return f"<frozen train() of {type(self.module).__name__}: stays in eval mode>"


def is_frozen(module: nn.Module) -> bool:
    """True when ``module`` is a BatchNorm layer frozen by ``freeze_batchnorm``."""
    return isinstance(module.__dict__.get("train"), _FrozenTrain)


def freeze_batchnorm(module: nn.Module, requires_grad: bool = False) -> nn.Module:
    """Freeze every BatchNorm layer in ``module`` (``module`` itself included) for fine-tuning.

    A frozen layer, whether ``syncbn.SyncBatchNorm``, ``torch.nn.SyncBatchNorm``,
    ``nn.BatchNorm1d/2d/3d`` or a subclass of them, is put in eval mode and stays there through
    every later ``model.train()``: it normalizes with its running statistics, never updates
    them and never communicates (a layer with ``track_running_stats=False`` has none, so it
    normalizes each batch with that rank's own statistics). Its own parameters (the affine weight and bias) get
    ``requires_grad=requires_grad``; pass True to keep training the affine transform while the
    statistics stay fixed.

    It works before or after ``convert_sync_batchnorm`` (conversion and reversion keep a
    layer frozen), and freezing travels with the model through ``copy.deepcopy``, pickling and
    ``torch.save`` of the whole model. Freezing is configuration, not state: ``state_dict()``
    keys do not change, a frozen model's state_dict loads into an unfrozen one and back, and
    ``load_state_dict`` leaves freezing as it is. Freezing a frozen layer again only sets
    ``requires_grad``. Returns ``module``.
    """
    if not isinstance(requires_grad, bool):
        raise TypeError(f"requires_grad must be a bool, got {type(requires_grad).__name__}")
    for layer in module.modules():
        if isinstance(layer, _BatchNorm):
            _freeze_layer(layer)
            for param in layer.parameters(recurse=False):
                param.requires_grad_(requires_grad)
    return module


def unfreeze_batchnorm(module: nn.Module) -> nn.Module:
    """Undo ``freeze_batchnorm`` for every frozen BatchNorm layer in ``module``.

    Each layer gets back the normal ``train`` and the ``requires_grad`` each of its parameters
    had before it was first frozen (True for a layer that was trainable, as is usual; a
    parameter that was already off stays off). Layers that are not frozen are left alone. The
    layer stays in eval mode until the next ``model.train()`` / ``model.eval()``, from which
    on it follows the model's mode again. Returns ``module``.
    """
    for layer in module.modules():
        frozen = layer.__dict__.get("train")
        if isinstance(frozen, _FrozenTrain):
            del layer.__dict__["train"]
            for name, param in layer.named_parameters(recurse=False):
                param.requires_grad_(frozen.requires_grad.get(name, True))
    return module


def _freeze_layer(layer: nn.Module, requires_grad: dict[str, bool] | None = None) -> None:
    """Install the frozen ``train`` on ``layer`` (keeping an existing record) and enter eval."""
    if not is_frozen(layer):
        if requires_grad is None:
            requires_grad = {name: param.requires_grad for name, param in layer.named_parameters(recurse=False)}
        layer.__dict__["train"] = _FrozenTrain(layer, requires_grad)
    layer.training = False


# ---------------------------------------------------------------------------------------------
# Conversion


@dataclass(frozen=True, slots=True)
class _Entry:
    """How conversion handles one BatchNorm class (see ``register_batchnorm_class``)."""

    to_sync: Callable[[nn.Module], SyncBatchNorm] | None = None
    to_plain: Callable[[SyncBatchNorm], nn.Module] | None = None


def _bare(cls: type[nn.Module]) -> nn.Module:
    """An instance of ``cls`` made without its constructor, as unpickling makes one.

    ``_move_into`` then gives it everything the layer it replaces had: tensors, flags and
    attributes (which came from an instance of ``cls`` in the first place), so it is that
    instance again whatever ``cls``'s constructor takes.
    """
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    return new


def _plain_by_dims(layer: SyncBatchNorm) -> nn.Module:
    """A plain BatchNorm for a layer with no class of its own to go back to.

    ``batchnorm_dim`` decides, else the input rank last seen in forward, else ``BatchNormXd``
    (any rank from 2-D to 5-D), so revert never needs a forward pass first.
    """
    if layer.batchnorm_dim is not None:
        return _bare(_BATCHNORM_CLASSES[layer.batchnorm_dim])
    return _bare(BATCHNORM_BY_INPUT_DIM.get(layer._input_dim, BatchNormXd))


# The classes conversion knows. _BatchNorm: nn.BatchNorm1d/2d/3d, and every subclass that keeps
# their forward, back to its own class. Synchronized classes go back to a plain BatchNorm.
_REGISTRY: dict[type, _Entry] = {
    _BatchNorm: _Entry(),
    nn.SyncBatchNorm: _Entry(to_plain=_plain_by_dims),
}
# Classes of optional libraries, by defining module and name. Entered in _REGISTRY once a
# conversion finds their module imported (their layers cannot exist before), so syncbn never
# imports them; a class registered by the user keeps the user's entry.
_TIMM = {
    "BatchNormAct2d": _Entry(to_sync=_timm.to_sync),
    "SyncBatchNormAct": _Entry(to_sync=_timm.to_sync, to_plain=_timm.to_batchnorm_act2d),
}
_OPTIONAL: tuple[tuple[str, str, _Entry], ...] = (
    *((module, name, entry) for module in _timm.NORM_ACT_MODULES for name, entry in _TIMM.items()),
    # mmengine's BatchNorm of any rank: the stock forward, back to _BatchNormXd
    ("mmengine.model.utils", "_BatchNormXd", _Entry()),
    # mmcv's MMSyncBN: not an nn.BatchNorm subclass, but the same fields and tensors
    ("mmcv.ops.sync_bn", "SyncBatchNorm", _Entry(to_plain=_plain_by_dims)),
)


def register_batchnorm_class(
    cls: type[nn.Module],
    to_sync: Callable[[nn.Module], SyncBatchNorm] | None = None,
    to_plain: Callable[[SyncBatchNorm], nn.Module] | None = None,
) -> None:
    """Teach ``convert_sync_batchnorm`` and ``revert_sync_batchnorm`` a BatchNorm class.

    For a library's BatchNorm class with a forward of its own (a fused activation, another
    input check), which conversion otherwise leaves alone with a warning, or one that does not
    subclass ``nn.BatchNorm`` at all. ``cls`` needs the fields and tensors of a BatchNorm layer
    (``num_features``, ``eps``, ``momentum``, ``affine``, ``track_running_stats``; ``weight``,
    ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``).

    Args:
        cls: the class. Its subclasses that do not override ``forward`` use the same entry.
        to_sync: ``to_sync(layer)`` builds the ``syncbn.SyncBatchNorm`` (or
            ``syncbn.SyncBatchNormAct``, or a subclass) that replaces ``layer``, an instance of
            ``cls``: it only picks the class and its options (``activation=``). Conversion then
            gives the new layer ``layer``'s own Parameter and buffer objects, its fields,
            training flag, freezing, plain attributes and children, and the process group.
            Default: ``syncbn.SyncBatchNorm``.
        to_plain: ``to_plain(layer)`` builds the module that replaces a syncbn layer converted
            from ``cls`` when reverting, filled in the same way. Default: ``cls`` itself.

    Registering a class again replaces its entry. Built in: ``nn.BatchNorm1d/2d/3d`` and
    their subclasses, ``torch.nn.SyncBatchNorm`` (reverts to a plain BatchNorm), timm's
    ``BatchNormAct2d`` and ``SyncBatchNormAct`` (to ``syncbn.SyncBatchNormAct``; both revert to
    ``BatchNormAct2d``), mmengine's ``_BatchNormXd`` and mmcv's ``SyncBatchNorm`` (MMSyncBN,
    reverts to a plain BatchNorm).
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"syncbn.register_batchnorm_class: cls must be an nn.Module class, got {cls!r}")
    if issubclass(cls, SyncBatchNorm):
        raise ValueError(f"syncbn.register_batchnorm_class: {_qualname(cls)} is already syncbn's own layer")
    for name, fn in (("to_sync", to_sync), ("to_plain", to_plain)):
        if fn is not None and not callable(fn):
            raise TypeError(f"syncbn.register_batchnorm_class: {name} must be callable or None, got {fn!r}")
    _REGISTRY[cls] = _Entry(to_sync, to_plain)


def _resolve_optional() -> None:
    for module_name, class_name, entry in _OPTIONAL:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type):
            _REGISTRY.setdefault(cls, entry)


def _entry_for(cls: type) -> _Entry | None:
    """``cls``'s entry: that of the nearest registered class in its MRO whose forward it keeps."""
    for base in cls.__mro__:
        entry = _REGISTRY.get(base)
        if entry is not None and getattr(base, "forward", None) is cls.forward:
            return entry
    return None


def _is_batchnorm(cls: type) -> bool:
    return issubclass(cls, _BatchNorm) or any(base in _REGISTRY for base in cls.__mro__)


def _patched(layer: nn.Module) -> bool:
    """An instance-level forward or a parametrization: conversion would drop either."""
    return "forward" in layer.__dict__ or parametrize.is_parametrized(layer)


def convert_sync_batchnorm(module: nn.Module, process_group: torch.distributed.ProcessGroup | None = None) -> nn.Module:
    """Replace every BatchNorm layer in ``module`` by a ``syncbn.SyncBatchNorm``.

    ``nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` and their subclasses that keep the
    stock ``forward`` become ``syncbn.SyncBatchNorm`` layers synchronizing over
    ``process_group`` (the whole world when None); so do mmengine's ``_BatchNormXd`` and mmcv's
    ``SyncBatchNorm``. timm's ``BatchNormAct2d`` and ``SyncBatchNormAct`` become
    ``syncbn.SyncBatchNormAct`` with the same activation (see ``syncbn.nn.SyncBatchNormAct``),
    and classes taught with ``register_batchnorm_class`` what their entry builds.

    Each new layer holds the *same* Parameter and buffer objects (so an optimizer built before
    conversion still trains it, and ``requires_grad``, device and dtype are unchanged) and the
    same children, the same training flag, eps, momentum (None included), affine,
    track_running_stats and freezing, and the old layer's plain attributes such as
    ``qconfig``; its state_dict keys are the old layer's. ``process_group`` applies to every
    layer, as with torch's own converter: a ``torch.nn.SyncBatchNorm``'s group is replaced, and
    existing ``syncbn.SyncBatchNorm`` layers stay the same objects but get ``process_group``.
    Every ``syncbn.SyncBatchNorm`` layer records its path in ``module`` (``layer1.0.bn1``), the
    name ``SYNCBN_DEBUG=1`` checks and error messages use, and the class it replaced, which
    ``revert_sync_batchnorm`` gives back.

    BatchNorm subclasses with a ``forward`` of their own that no entry covers, parametrized
    layers and layers with an instance-level ``forward`` are left as they are, under one
    ``UserWarning`` line with their number, classes and first paths: converting them would
    silently drop what their forward adds.

    Raises ValueError, before changing anything, for a lazy BatchNorm
    (``nn.LazyBatchNorm2d`` and co.) that has not run its first forward pass: its number of
    features is not known yet. (After its first forward pass torch turns it into a plain
    ``nn.BatchNormNd``, which converts normally.)

    Returns ``module``, or the new layer when ``module`` itself is a BatchNorm layer.
    """
    for path, layer in module.named_modules():
        if isinstance(layer, LazyModuleMixin) and isinstance(layer, _BatchNorm):
            raise ValueError(
                f"syncbn.convert_sync_batchnorm: {_describe(path, layer)} is an uninitialized "
                "lazy BatchNorm: its number of features is only known after its first forward "
                "pass. Run one forward pass (a dummy batch will do) before converting."
            )
    _resolve_optional()
    replacements: dict[int, nn.Module] = {}
    skipped: list[tuple[str, nn.Module]] = []
    for path, layer in module.named_modules():
        if isinstance(layer, SyncBatchNorm) or not _is_batchnorm(type(layer)):
            continue
        entry = None if _patched(layer) else _entry_for(type(layer))
        if entry is None:
            skipped.append((path, layer))
        else:
            replacements[id(layer)] = _to_syncbn(layer, entry)
    for layer in module.modules():
        if isinstance(layer, SyncBatchNorm):
            layer.process_group = process_group
    for new in replacements.values():
        new.process_group = process_group
    converted = _splice(module, replacements, {})
    for path, layer in converted.named_modules():
        if isinstance(layer, SyncBatchNorm) and path:
            layer._syncbn_name = path  # names the layer in SYNCBN_DEBUG checks and errors
    if skipped:
        why = "unsynchronized (own forward or parametrization; see syncbn.register_batchnorm_class)"
        warnings.warn(_left_alone("convert_sync_batchnorm", why, skipped), UserWarning, stacklevel=2)
    return converted


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``syncbn.SyncBatchNorm`` in ``module`` by the layer it was converted from.

    For export, single-device inference and tools that expect plain BatchNorm. Each layer goes
    back to exactly the class ``convert_sync_batchnorm`` replaced (``nn.BatchNorm2d``, a
    subclass of it, mmengine's ``_BatchNormXd``, timm's ``BatchNormAct2d``, ...). A layer
    converted from a synchronized class (``torch.nn.SyncBatchNorm``, mmcv's ``SyncBatchNorm``;
    timm's ``SyncBatchNormAct`` becomes ``BatchNormAct2d``) or built directly as
    ``syncbn.SyncBatchNorm`` becomes the plain BatchNorm of its dimensionality:
    ``layer.batchnorm_dim`` (1, 2 or 3) when set, else the one that accepts the inputs it last
    saw in forward (2-D or 3-D: ``nn.BatchNorm1d``, 4-D: 2d, 5-D: 3d), else
    ``syncbn.nn.BatchNormXd``, which accepts 2-D to 5-D input. Reverting needs no forward pass.

    The new layer keeps the same Parameter and buffer objects and children, training flag, eps,
    momentum, affine, track_running_stats, freezing and plain attributes (``qconfig``); the
    process group is dropped. Subclasses of ``syncbn.SyncBatchNorm`` with their own ``forward``
    and ``syncbn.SyncBatchNormAct`` layers built directly (there is no plain BatchNorm with an
    activation to go back to) are left as they are, with a warning; ``torch.nn.SyncBatchNorm``
    layers are not touched. Raises ValueError, before changing anything, for a
    ``batchnorm_dim`` other than None, 1, 2 or 3.

    Returns ``module``, or the new layer when ``module`` itself is a ``syncbn.SyncBatchNorm``.
    """
    for path, layer in module.named_modules():
        if isinstance(layer, SyncBatchNorm) and layer.batchnorm_dim not in (None, *_BATCHNORM_CLASSES):
            raise ValueError(
                f"syncbn.revert_sync_batchnorm: {_describe(path, layer)} has batchnorm_dim "
                f"{layer.batchnorm_dim!r}; it must be None, 1, 2 or 3 (for nn.BatchNorm1d, 2d, 3d)"
            )
    _resolve_optional()
    replacements: dict[int, nn.Module] = {}
    skipped: list[tuple[str, nn.Module]] = []
    for path, layer in module.named_modules():
        if not isinstance(layer, SyncBatchNorm):
            continue
        own_forward = type(layer).forward not in (SyncBatchNorm.forward, SyncBatchNormAct.forward)
        no_plain_class = isinstance(layer, SyncBatchNormAct) and layer.converted_from is None
        if own_forward or no_plain_class or _patched(layer):
            skipped.append((path, layer))
        else:
            replacements[id(layer)] = _to_plain(layer)
    reverted = _splice(module, replacements, {})
    if skipped:
        why = "synchronized (own forward, or no plain class to go back to)"
        warnings.warn(_left_alone("revert_sync_batchnorm", why, skipped), UserWarning, stacklevel=2)
    return reverted


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _describe(path: str, layer: nn.Module) -> str:
    return f"'{path or '<root>'}' ({_qualname(type(layer))})"


def _left_alone(tool: str, why: str, skipped: list[tuple[str, nn.Module]], shown: int = 3) -> str:
    """One line: how many layers ``tool`` left, why, their classes and the first few paths."""
    classes = ", ".join(sorted({_qualname(type(layer)) for _, layer in skipped}))
    paths = ", ".join(f"'{path or '<root>'}'" for path, _ in skipped[:shown])
    more = f" and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return f"syncbn.{tool} left {len(skipped)} BatchNorm layer(s) {why}: {classes} at {paths}{more}"


def _splice(module: nn.Module, replacements: dict[int, nn.Module], done: dict[int, nn.Module]) -> nn.Module:
    """Put each replacement where its layer was; its children move into it.

    Only called once every replacement is built, so a failing ``to_sync`` changes nothing.
    ``done`` maps id(old) -> new so that a layer registered at several places becomes one new
    layer (children are read from ``_modules`` directly: ``named_children`` hides a second
    registration of the same module).
    """
    if id(module) in done:
        return done[id(module)]
    new = replacements.get(id(module), module)
    done[id(module)] = new
    for name, child in list(module._modules.items()):
        if child is None:
            if new is not module:
                new._modules[name] = None
            continue
        new_child = _splice(child, replacements, done)
        if new is not module or new_child is not child:
            new.add_module(name, new_child)
    return new


def _batchnorm_dim(layer: nn.Module) -> int | None:
    for dim, cls in _BATCHNORM_CLASSES.items():
        if isinstance(layer, cls):
            return dim
    return None


def _to_syncbn(layer: nn.Module, entry: _Entry) -> SyncBatchNorm:
    # Built on the meta device: every tensor is replaced by the old layer's own right after.
    new = entry.to_sync(layer) if entry.to_sync is not None else SyncBatchNorm(layer.num_features, device="meta")
    if not isinstance(new, SyncBatchNorm):
        raise TypeError(
            f"syncbn.convert_sync_batchnorm: the to_sync registered for {_qualname(type(layer))} returned "
            f"{type(new).__name__}, not a syncbn.SyncBatchNorm"
        )
    _move_into(layer, new, _NOT_CARRIED)
    new.converted_from = type(layer)
    new.batchnorm_dim = _batchnorm_dim(layer)  # None for torch.nn.SyncBatchNorm
    return new


def _to_plain(layer: SyncBatchNorm) -> nn.Module:
    origin = layer.converted_from
    if origin is None:
        new = _plain_by_dims(layer)
    else:
        entry = _entry_for(origin)
        new = entry.to_plain(layer) if entry is not None and entry.to_plain is not None else _bare(origin)
        if isinstance(new, SyncBatchNorm) or not isinstance(new, nn.Module):
            raise TypeError(
                f"syncbn.revert_sync_batchnorm: the to_plain registered for {_qualname(origin)} returned "
                f"{type(new).__name__}, not a plain nn.Module"
            )
    _move_into(layer, new, _SYNCBN_OWN)
    return new


def _move_into(old: nn.Module, new: nn.Module, not_carried: frozenset[str]) -> None:
    """Give ``new`` the very Parameter and buffer objects, fields, flags and attributes of ``old``."""
    new._parameters.clear()
    new._parameters.update(old._parameters)  # also a None bias (affine, bias=False)
    new._buffers.clear()
    new._buffers.update(old._buffers)
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    new.training = old.training
    for field in _BATCHNORM_FIELDS:
        if field in old.__dict__:
            new.__dict__[field] = old.__dict__[field]
    for key, value in old.__dict__.items():
        # Plain attributes set by model code (qconfig, tags); the layer's own fields and hook
        # tables are already there on the new object.
        if key not in new.__dict__ and key not in not_carried:
            new.__dict__[key] = value
    frozen = old.__dict__.get("train")
    if isinstance(frozen, _FrozenTrain):
        _freeze_layer(new, dict(frozen.requires_grad))
