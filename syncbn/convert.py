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

Freezing is configuration, not state: a frozen layer's ``state_dict`` has exactly the keys of an
unfrozen one (and of ``nn.BatchNorm2d``), loading a state_dict neither freezes nor unfreezes,
and the freezing itself travels with the module object through ``copy.deepcopy``, ``pickle``,
``torch.save(model)`` / ``torch.load(..., weights_only=False)``, conversion and reversion.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from .nn import SyncBatchNorm

__all__ = [
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
    "freeze_batchnorm",
    "unfreeze_batchnorm",
    "is_frozen",
]

# nn.BatchNorm{1,2,3}d <-> the dimensionality syncbn.SyncBatchNorm.batchnorm_dim records.
_BATCHNORM_CLASSES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
#: Input rank -> the single-process nn.BatchNormNd that accepts it.
BATCHNORM_BY_INPUT_DIM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
# The forwards conversion can replace without losing behaviour.
_STOCK_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward, SyncBatchNorm.forward)
# Instance attributes that belong to one layer class or one object and are not carried over:
# the frozen ``train`` is rebuilt for the new object, the rest is syncbn.SyncBatchNorm's own.
_NOT_CARRIED = frozenset({"train", "forward", "process_group", "batchnorm_dim", "_input_dim", "_syncbn_name"})


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


def convert_sync_batchnorm(module: nn.Module, process_group: torch.distributed.ProcessGroup | None = None) -> nn.Module:
    """Replace every BatchNorm layer in ``module`` by a ``syncbn.SyncBatchNorm``.

    ``nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` and their subclasses that keep the
    stock ``forward`` become ``syncbn.SyncBatchNorm`` layers synchronizing over
    ``process_group`` (the whole world when None). Each new layer holds the *same* Parameter
    and buffer objects (so an optimizer built before conversion still trains it, and
    ``requires_grad``, device and dtype are unchanged), the same training flag, eps, momentum
    (None included), affine, track_running_stats and freezing, and the old layer's plain
    attributes such as ``qconfig``. ``process_group`` applies to every layer, as with torch's
    own converter: a ``torch.nn.SyncBatchNorm``'s group is replaced, and existing
    ``syncbn.SyncBatchNorm`` layers stay the same objects but get ``process_group``. Every
    ``syncbn.SyncBatchNorm`` layer records its path in ``module`` (``layer1.0.bn1``), the name
    ``SYNCBN_DEBUG=1`` checks and error messages use.

    Subclasses that bring their own ``forward`` (BatchNorm+activation layers of model zoos),
    parametrized layers and layers with an instance-level ``forward`` are left as they are,
    with one ``UserWarning`` naming each by its path in the model and its qualified class name:
    converting them would silently drop what their forward adds.

    ``revert_sync_batchnorm`` gives back ``nn.BatchNormNd`` of the dimensionality recorded
    here; ``torch.nn.SyncBatchNorm`` does not know its dimensionality, so a layer converted from
    it reverts by the rank of the inputs it has seen since.

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
    for layer in module.modules():
        if isinstance(layer, SyncBatchNorm):
            layer.process_group = process_group
    skipped: list[str] = []
    converted = _replace(
        module, "", {}, skipped, _convertible_to_syncbn, lambda layer: _to_syncbn(layer, process_group)
    )
    for path, layer in converted.named_modules():
        if isinstance(layer, SyncBatchNorm) and path:
            layer._syncbn_name = path  # names the layer in SYNCBN_DEBUG checks and errors
    if skipped:
        warnings.warn(
            "syncbn.convert_sync_batchnorm left these BatchNorm layers as they are, because "
            "converting them would drop their own forward (convert them with their library's "
            "tool or replace them by hand): " + ", ".join(skipped),
            UserWarning,
            stacklevel=2,
        )
    return converted


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``syncbn.SyncBatchNorm`` in ``module`` by a plain ``nn.BatchNorm1d/2d/3d``.

    For export, single-device inference and tools that expect plain BatchNorm. The class is the
    one recorded at conversion (``layer.batchnorm_dim``); for a layer built directly as
    ``syncbn.SyncBatchNorm`` or converted from ``torch.nn.SyncBatchNorm``, the one that accepts
    the inputs it last saw in forward (2-D or 3-D: 1d, 4-D: 2d, 5-D: 3d). A layer with neither
    raises ValueError naming it, before anything is changed; run one forward pass or set
    ``layer.batchnorm_dim = 1, 2 or 3`` first.

    The new layer keeps the same Parameter and buffer objects, training flag, eps, momentum,
    affine, track_running_stats, freezing and plain attributes (``qconfig``); the process group
    is dropped. Subclasses of ``syncbn.SyncBatchNorm`` with their own ``forward`` are left as
    they are, with a warning; ``torch.nn.SyncBatchNorm`` layers are not touched.

    Returns ``module``, or the new layer when ``module`` itself is a ``syncbn.SyncBatchNorm``.
    """
    unknown = [
        _describe(path, layer)
        for path, layer in module.named_modules()
        if _convertible_to_batchnorm(layer) and _revert_class(layer) is None
    ]
    if unknown:
        raise ValueError(
            "syncbn.revert_sync_batchnorm: cannot tell whether to make nn.BatchNorm1d, 2d or 3d "
            f"of {', '.join(unknown)}: built as syncbn.SyncBatchNorm or converted from "
            "torch.nn.SyncBatchNorm, and no input seen since. Run one forward pass, or set "
            "`layer.batchnorm_dim` to 1, 2 or 3 (for nn.BatchNorm1d, 2d, 3d)."
        )
    skipped: list[str] = []
    reverted = _replace(module, "", {}, skipped, _convertible_to_batchnorm, _to_batchnorm)
    if skipped:
        warnings.warn(
            "syncbn.revert_sync_batchnorm left these SyncBatchNorm layers as they are, because "
            "reverting them would drop their own forward: " + ", ".join(skipped),
            UserWarning,
            stacklevel=2,
        )
    return reverted


def _describe(path: str, layer: nn.Module) -> str:
    cls = type(layer)
    return f"'{path or '<root>'}' ({cls.__module__}.{cls.__qualname__})"


def _own_forward(layer: nn.Module) -> bool:
    """True when the layer's forward is not a stock BatchNorm forward (so conversion would drop it)."""
    return (
        type(layer).forward not in _STOCK_FORWARDS or "forward" in layer.__dict__ or parametrize.is_parametrized(layer)
    )


def _convertible_to_syncbn(layer: nn.Module) -> bool | None:
    """True: convert; None: a BatchNorm to leave (with a warning); False: not a candidate."""
    if not isinstance(layer, _BatchNorm) or isinstance(layer, SyncBatchNorm):
        return False
    return None if _own_forward(layer) else True


def _convertible_to_batchnorm(layer: nn.Module) -> bool | None:
    if not isinstance(layer, SyncBatchNorm):
        return False
    return None if _own_forward(layer) else True


def _replace(module, path, memo, skipped, convertible, make):
    """Rebuild the tree: ``make`` each convertible layer, recurse into every child.

    ``memo`` maps id(old) -> new so that a layer registered at several places becomes one new
    layer (children are read from ``_modules`` directly: ``named_children`` hides a second
    registration of the same module).
    """
    if id(module) in memo:
        return memo[id(module)]
    kind = convertible(module)
    new = make(module) if kind else module
    if kind is None:
        skipped.append(_describe(path, module))
    memo[id(module)] = new
    for name, child in list(module._modules.items()):
        if child is None:
            if new is not module:
                new._modules[name] = None
            continue
        child_path = f"{path}.{name}" if path else name
        new_child = _replace(child, child_path, memo, skipped, convertible, make)
        if new is not module or new_child is not child:
            new.add_module(name, new_child)
    return new


def _batchnorm_dim(layer: nn.Module) -> int | None:
    for dim, cls in _BATCHNORM_CLASSES.items():
        if isinstance(layer, cls):
            return dim
    return None


def _revert_class(layer: SyncBatchNorm) -> type[_BatchNorm] | None:
    if layer.batchnorm_dim is not None:
        if layer.batchnorm_dim not in _BATCHNORM_CLASSES:
            raise ValueError(f"batchnorm_dim must be 1, 2 or 3, got {layer.batchnorm_dim!r}")
        return _BATCHNORM_CLASSES[layer.batchnorm_dim]
    return BATCHNORM_BY_INPUT_DIM.get(layer._input_dim)


def _to_syncbn(layer: _BatchNorm, process_group) -> SyncBatchNorm:
    # Built on the meta device: every tensor is replaced by the old layer's own right after.
    new = SyncBatchNorm(
        layer.num_features,
        layer.eps,
        layer.momentum,
        layer.affine,
        layer.track_running_stats,
        process_group=process_group,
        device="meta",
    )
    _move_into(layer, new)
    new.batchnorm_dim = _batchnorm_dim(layer)  # None for torch.nn.SyncBatchNorm
    return new


def _to_batchnorm(layer: SyncBatchNorm) -> _BatchNorm:
    cls = _revert_class(layer)
    new = cls(
        layer.num_features,
        layer.eps,
        layer.momentum,
        layer.affine,
        layer.track_running_stats,
        device="meta",
    )
    _move_into(layer, new)
    return new


def _move_into(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the very Parameter and buffer objects, flags and attributes of ``old``."""
    new._parameters.clear()
    new._parameters.update(old._parameters)  # also a None bias (affine, bias=False)
    new._buffers.clear()
    new._buffers.update(old._buffers)
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    new.training = old.training
    for key, value in old.__dict__.items():
        # Plain attributes set by model code (qconfig, tags); the layer's own fields and hook
        # tables are already there on the new object.
        if key not in new.__dict__ and key not in _NOT_CARRIED:
            new.__dict__[key] = value
    frozen = old.__dict__.get("train")
    if isinstance(frozen, _FrozenTrain):
        _freeze_layer(new, dict(frozen.requires_grad))
