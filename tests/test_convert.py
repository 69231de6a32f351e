"""Model tools, single process: convert / revert / freeze / unfreeze and checkpoints.

    python -m pytest -q tests/test_convert.py

The multi-process checks (sub-groups, a frozen layer's collective count) are in test_groups.py.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import syncbn
from syncbn import is_frozen

BN_STATE_KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-default parameters and running statistics, so that copies can be told apart."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, _BatchNorm):
                for t in (layer.weight, layer.bias, layer.running_mean):
                    if t is not None:
                        t.copy_(torch.randn(t.shape, generator=gen))
                if layer.running_var is not None:
                    layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=gen) + 0.5)
                    layer.num_batches_tracked.fill_(7)
    return module


def _tensors(layer: nn.Module) -> dict[str, torch.Tensor | None]:
    """The layer's own parameters and buffers by name (None entries included)."""
    return {**layer._parameters, **layer._buffers}


def _flags(layer: nn.Module) -> tuple:
    return (
        layer.num_features,
        layer.eps,
        layer.momentum,
        layer.affine,
        layer.track_running_stats,
        layer.training,
        is_frozen(layer),
    )


def _assert_same_objects(old: nn.Module, new: nn.Module) -> None:
    old_t, new_t = _tensors(old), _tensors(new)
    assert list(old_t) == list(new_t)
    for name in old_t:
        assert new_t[name] is old_t[name], name


class Mixed(nn.Module):
    """1d/2d/3d BatchNorm, torch SyncBN, frozen parts, requires_grad off, an eval sub-module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8, momentum=None)
        self.head = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6, eps=1e-3))
        self.video = nn.Sequential(nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4, affine=False))
        self.torch_sync = nn.SyncBatchNorm(8, momentum=0.3)
        self.frozen = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU())
        self.no_grad_bn = nn.BatchNorm1d(6)
        self.eval_part = nn.Sequential(nn.BatchNorm2d(8, track_running_stats=False))
        self.no_bias = nn.BatchNorm2d(8, bias=False)
        for p in self.no_grad_bn.parameters():
            p.requires_grad_(False)
        self.no_grad_bn.qconfig = "some-qconfig"
        syncbn.freeze_batchnorm(self.frozen)
        self.eval_part.eval()

    def forward(self, image: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv(image))
        x = self.no_bias(self.eval_part(self.frozen(self.torch_sync(x))))
        pooled = x.mean((2, 3))
        y = self.no_grad_bn(self.head(pooled))
        z = self.video(video).mean((1, 2, 3, 4))
        return y.sum(1) + z


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 5, 5, generator=gen), torch.randn(4, 3, 2, 3, 3, generator=gen)


def _snapshot(model: nn.Module) -> dict:
    """Per layer path: class, flags, identities of tensors, requires_grad, values of state."""
    out = {}
    for path, layer in model.named_modules():
        if isinstance(layer, _BatchNorm):
            tensors = _tensors(layer)
            out[path] = dict(
                flags=_flags(layer),
                ids={k: id(v) for k, v in tensors.items()},
                requires_grad={k: v.requires_grad for k, v in layer._parameters.items() if v is not None},
                state={k: v.clone() for k, v in layer.state_dict().items()},
                qconfig=getattr(layer, "qconfig", None),
            )
    return out


def _assert_snapshot_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for path in a:
        for key in ("flags", "ids", "requires_grad", "qconfig"):
            assert a[path][key] == b[path][key], (path, key)
        assert a[path]["state"].keys() == b[path]["state"].keys(), path
        for k in a[path]["state"]:
            torch.testing.assert_close(a[path]["state"][k], b[path]["state"][k], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# convert_sync_batchnorm


@pytest.mark.parametrize(
    "make, dim",
    [
        (lambda: nn.BatchNorm1d(5), 1),
        (lambda: nn.BatchNorm2d(5), 2),
        (lambda: nn.BatchNorm3d(5), 3),
        (lambda: nn.SyncBatchNorm(5), None),  # torch's SyncBN does not know its dimensionality
    ],
)
def test_convert_root_layer_keeps_objects_and_flags(make, dim):
    old = _randomize(make())
    new = syncbn.convert_sync_batchnorm(old)
    assert type(new) is syncbn.SyncBatchNorm and new is not old
    _assert_same_objects(old, new)
    assert _flags(new) == _flags(old)
    assert new.batchnorm_dim == dim
    assert list(new.state_dict()) == BN_STATE_KEYS


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(momentum=None),
        dict(eps=1e-3, momentum=0.01),
        dict(affine=False),
        dict(track_running_stats=False),
        dict(affine=False, track_running_stats=False),
        dict(bias=False),  # affine weight without a bias
    ],
)
def test_convert_flag_combinations(kwargs):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _randomize(nn.BatchNorm2d(4, **kwargs)))
    old = model[1]
    out = syncbn.convert_sync_batchnorm(model)
    assert out is model
    new = model[1]
    assert isinstance(new, syncbn.SyncBatchNorm)
    assert _flags(new) == _flags(old)
    _assert_same_objects(old, new)
    assert (new.bias is None) == (old.bias is None)
    assert list(new.state_dict()) == list(old.state_dict())


@pytest.mark.parametrize("train", [True, False])
def test_converted_model_computes_what_the_original_did(train):
    torch.manual_seed(0)
    # float64: the layers chain small-variance BatchNorms, which amplify float32 rounding-order
    # differences tenfold per layer; in float64 the same math must agree to 1e-10.
    ref = _randomize(Mixed()).double()
    ref.train(train)
    model = copy.deepcopy(ref)
    syncbn.convert_sync_batchnorm(model)
    image, video = (t.double() for t in _inputs())
    # Same math on one process (no process group): only float rounding order may differ.
    torch.testing.assert_close(model(image, video), ref(image, video), rtol=1e-10, atol=1e-10)
    for (path, a), (_, b) in zip(ref.named_modules(), model.named_modules()):
        if isinstance(a, _BatchNorm):
            for k, v in a.state_dict().items():
                torch.testing.assert_close(b.state_dict()[k], v, rtol=1e-10, atol=1e-12, msg=path)


def test_optimizer_built_before_conversion_trains_converted_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    syncbn.convert_sync_batchnorm(model)
    bn = model[1]
    assert isinstance(bn, syncbn.SyncBatchNorm)
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert {id(bn.weight), id(bn.bias)} <= in_opt
    before = bn.weight.detach().clone(), bn.bias.detach().clone()
    model(torch.randn(4, 3, 6, 6)).square().mean().backward()
    assert bn.weight.grad is not None and bn.bias.grad is not None
    opt.step()
    assert not torch.equal(bn.weight, before[0])
    assert not torch.equal(bn.bias, before[1])


def test_convert_keeps_requires_grad_training_qconfig_and_attributes():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm2d(3))
    model[0].weight.requires_grad_(False)
    model[1].eval()
    model[0].qconfig = "qconfig-object"
    model[1].no_weight_decay = True  # a tag some training code sets on norm layers
    syncbn.convert_sync_batchnorm(model)
    assert model[0].weight.requires_grad is False and model[0].bias.requires_grad is True
    assert model[0].training is True and model[1].training is False
    assert model[0].qconfig == "qconfig-object"
    assert model[1].no_weight_decay is True
    assert not hasattr(model[1], "qconfig")
    syncbn.revert_sync_batchnorm(model)
    assert model[0].qconfig == "qconfig-object" and model[1].no_weight_decay is True


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_convert_keeps_dtype_and_device(dtype):
    model = nn.Sequential(nn.BatchNorm2d(4, dtype=dtype), nn.BatchNorm1d(4, device="meta"))
    syncbn.convert_sync_batchnorm(model)
    assert model[0].weight.dtype == dtype and model[0].running_mean.dtype == dtype
    assert model[0].num_batches_tracked.dtype == torch.long
    assert model[1].weight.device.type == "meta" and model[1].running_var.device.type == "meta"
    # Nothing of the construction (done on the meta device) leaks into a CPU layer.
    assert all(t.device.type == "cpu" for t in model[0].state_dict().values())


def test_convert_sets_process_group_on_every_layer():
    group = object()  # stands in for a ProcessGroup: nothing is communicated here
    model = nn.Sequential(nn.BatchNorm2d(2), nn.SyncBatchNorm(2), syncbn.SyncBatchNorm(2))
    existing = model[2]
    syncbn.convert_sync_batchnorm(model, process_group=group)
    assert model[2] is existing  # already syncbn: the same object
    assert all(layer.process_group is group for layer in model)


def test_shared_layer_becomes_one_new_layer():
    shared = nn.BatchNorm2d(3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    model.extra = shared  # a third registration, in the same parent
    syncbn.convert_sync_batchnorm(model)
    assert isinstance(model[0], syncbn.SyncBatchNorm)
    assert model[0] is model[2] is model.extra


def test_convert_is_idempotent():
    model = _randomize(Mixed())
    syncbn.convert_sync_batchnorm(model)
    layers = list(model.modules())
    syncbn.convert_sync_batchnorm(model)
    assert list(model.modules()) == layers


class BatchNormAct2d(nn.BatchNorm2d):
    """What model zoos do: BatchNorm + activation in one layer, with its own forward."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class TorchSyncBNAct(nn.SyncBatchNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class TaggedBatchNorm2d(nn.BatchNorm2d):
    """A subclass that adds nothing to forward: converted like nn.BatchNorm2d."""


def test_custom_forward_subclasses_warn_and_stay():
    model = nn.Sequential(nn.BatchNorm2d(3), BatchNormAct2d(3), nn.Sequential(TorchSyncBNAct(3)))
    keep = model[1], model[2][0]
    with pytest.warns(UserWarning) as record:
        syncbn.convert_sync_batchnorm(model)
    assert len(record) == 1
    message = str(record[0].message)
    assert "\n" not in message and message.startswith("syncbn.convert_sync_batchnorm left 2 BatchNorm layer(s)")
    assert f"{__name__}.BatchNormAct2d, {__name__}.TorchSyncBNAct at '1', '2.0'" in message
    assert "register_batchnorm_class" in message
    assert model[1] is keep[0] and model[2][0] is keep[1]
    assert type(model[1]) is BatchNormAct2d
    assert isinstance(model[0], syncbn.SyncBatchNorm)
    # the child of the unconverted layer was still visited (and is not a BatchNorm: unchanged)
    assert isinstance(model[1].act, nn.ReLU)


def test_subclass_without_own_forward_converts_silently_and_reverts_to_itself():
    model = nn.Sequential(TaggedBatchNorm2d(3))
    model[0].tag = "kept"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        syncbn.convert_sync_batchnorm(model)
    assert type(model[0]) is syncbn.SyncBatchNorm and model[0].batchnorm_dim == 2
    assert model[0].converted_from is TaggedBatchNorm2d
    syncbn.revert_sync_batchnorm(model)
    assert type(model[0]) is TaggedBatchNorm2d and model[0].tag == "kept"


def test_instance_forward_and_parametrized_layers_warn():
    patched = nn.BatchNorm2d(3)
    patched.forward = lambda x: x  # an instance-level forward patch
    param = nn.BatchNorm2d(3)
    torch.nn.utils.parametrize.register_parametrization(param, "weight", nn.Identity())
    model = nn.Sequential(patched, param)
    with pytest.warns(UserWarning, match=r"left 2 .*parametrize\.ParametrizedBatchNorm2d at '0', '1'$"):
        syncbn.convert_sync_batchnorm(model)
    assert model[0] is patched and model[1] is param


# ---------------------------------------------------------------------------------------------
# register_batchnorm_class


@pytest.fixture
def registry(monkeypatch):
    """Registrations made by the test are gone after it."""
    monkeypatch.setattr(syncbn.convert, "_REGISTRY", dict(syncbn.convert._REGISTRY))


class BatchNormSiLU2d(nn.BatchNorm2d):
    """A library's fused BatchNorm + SiLU, with a constructor revert cannot call blindly."""

    def __init__(self, num_features: int, tag: str, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps=eps)
        self.tag = tag

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))


class PlainModuleBatchNorm(nn.Module):
    """BatchNorm fields and tensors without subclassing nn.BatchNorm (as mmcv's SyncBatchNorm)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, 1e-5, 0.1
        self.affine, self.track_running_stats = True, True
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.num_batches_tracked += self.training
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1)


def test_registered_class_converts_to_its_sync_layer_and_back(registry):
    syncbn.register_batchnorm_class(
        BatchNormSiLU2d, to_sync=lambda layer: syncbn.SyncBatchNormAct(layer.num_features, activation="silu")
    )
    old = _randomize(BatchNormSiLU2d(4, tag="mine", eps=1e-3))
    reference, tensors = copy.deepcopy(old), _tensors(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = syncbn.convert_sync_batchnorm(nn.Sequential(old))[0]
    assert type(new) is syncbn.SyncBatchNormAct and new.activation == "silu"
    assert (new.eps, new.tag) == (1e-3, "mine") and _tensors(new) == tensors
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(new(x), reference(x))  # training mode, running statistics updated
    torch.testing.assert_close(new.running_var, reference.running_var)
    back = syncbn.revert_sync_batchnorm(nn.Sequential(new))[0]
    assert type(back) is BatchNormSiLU2d and (back.eps, back.tag) == (1e-3, "mine") and _tensors(back) == tensors
    assert "activation" not in back.__dict__


def test_registered_class_covers_subclasses_that_keep_its_forward(registry):
    syncbn.register_batchnorm_class(
        BatchNormSiLU2d, to_sync=lambda layer: syncbn.SyncBatchNormAct(1, activation="silu")
    )

    class Same(BatchNormSiLU2d):
        pass

    class Other(BatchNormSiLU2d):
        def forward(self, x):
            return super().forward(x) + 1

    model = nn.Sequential(Same(2, "a"), Other(2, "b"))
    with pytest.warns(UserWarning, match=r"left 1 .*Other at '1'$"):
        syncbn.convert_sync_batchnorm(model)
    assert type(model[0]) is syncbn.SyncBatchNormAct and model[0].num_features == 2  # the field is carried
    assert type(model[1]) is Other
    syncbn.revert_sync_batchnorm(model)
    assert type(model[0]) is Same and model[0].tag == "a"


def test_registered_module_that_is_not_a_batchnorm_subclass(registry):
    model = nn.Sequential(PlainModuleBatchNorm(3))
    syncbn.convert_sync_batchnorm(model)
    assert type(model[0]) is PlainModuleBatchNorm  # unknown: not a BatchNorm to syncbn
    syncbn.register_batchnorm_class(PlainModuleBatchNorm)
    old = model[0]
    syncbn.convert_sync_batchnorm(model)
    assert type(model[0]) is syncbn.SyncBatchNorm
    _assert_same_objects(old, model[0])
    x = torch.randn(4, 3) * 2
    torch.testing.assert_close(model[0](x), F.batch_norm(x, None, None, old.weight, old.bias, True))
    syncbn.revert_sync_batchnorm(model)
    assert type(model[0]) is PlainModuleBatchNorm
    _assert_same_objects(old, model[0])
    assert int(model[0].num_batches_tracked) == 1


def test_a_to_sync_that_builds_the_wrong_layer_changes_nothing(registry):
    syncbn.register_batchnorm_class(BatchNormSiLU2d, to_sync=lambda layer: nn.BatchNorm2d(layer.num_features))
    model = nn.Sequential(nn.BatchNorm2d(2), BatchNormSiLU2d(2, "x"))
    first = model[0]
    with pytest.raises(TypeError, match=r"to_sync registered for tests\.test_convert\.BatchNormSiLU2d returned "
                       "BatchNorm2d, not a syncbn.SyncBatchNorm"):  # fmt: skip
        syncbn.convert_sync_batchnorm(model)
    assert model[0] is first


def test_register_rejects_bad_arguments(registry):
    with pytest.raises(TypeError, match="nn.Module class"):
        syncbn.register_batchnorm_class(nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="already syncbn's own layer"):
        syncbn.register_batchnorm_class(syncbn.SyncBatchNormAct)
    with pytest.raises(TypeError, match="to_plain must be callable"):
        syncbn.register_batchnorm_class(BatchNormSiLU2d, to_plain="BatchNorm2d")


def test_uninitialized_lazy_batchnorm_is_a_clear_error():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(nn.LazyBatchNorm2d()))
    first = model[0]
    with pytest.raises(ValueError, match=r"'1\.0' \(torch\.nn\.modules\.batchnorm\.LazyBatchNorm2d\).*lazy"):
        syncbn.convert_sync_batchnorm(model)
    assert model[0] is first  # nothing converted before the error


def test_initialized_lazy_batchnorm_converts():
    model = nn.Sequential(nn.LazyBatchNorm2d())
    model(torch.randn(2, 3, 4, 4))  # first forward: torch turns it into a BatchNorm2d
    assert type(model[0]) is nn.BatchNorm2d
    old = model[0]
    syncbn.convert_sync_batchnorm(model)
    assert isinstance(model[0], syncbn.SyncBatchNorm) and model[0].num_features == 3
    _assert_same_objects(old, model[0])
    assert model[0].batchnorm_dim == 2


# ---------------------------------------------------------------------------------------------
# revert_sync_batchnorm


@pytest.mark.parametrize("cls", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d])
def test_revert_gives_back_the_original_class(cls):
    old = _randomize(cls(4, momentum=None, eps=1e-4))
    old.eval()
    converted = syncbn.convert_sync_batchnorm(old)
    reverted = syncbn.revert_sync_batchnorm(converted)
    assert type(reverted) is cls
    _assert_same_objects(old, reverted)
    assert _flags(reverted) == _flags(old)
    for attr in ("process_group", "converted_from", "batchnorm_dim", "_input_dim", "_syncbn_name"):
        assert attr not in reverted.__dict__


@pytest.mark.parametrize(
    "shape, cls",
    [
        ((4, 3), nn.BatchNorm1d),
        ((4, 3, 5), nn.BatchNorm1d),
        ((2, 3, 4, 4), nn.BatchNorm2d),
        ((2, 3, 2, 2, 2), nn.BatchNorm3d),
    ],
)
def test_revert_layer_built_directly_uses_the_inputs_it_saw(shape, cls):
    layer = syncbn.SyncBatchNorm(3)
    layer(torch.randn(shape))
    reverted = syncbn.revert_sync_batchnorm(nn.Sequential(layer))[0]
    assert type(reverted) is cls
    _assert_same_objects(layer, reverted)


def test_revert_torch_syncbn_uses_inputs_seen_after_conversion():
    model = nn.Sequential(nn.SyncBatchNorm(3))
    syncbn.convert_sync_batchnorm(model)
    model(torch.randn(2, 3, 2, 2, 2))
    assert type(syncbn.revert_sync_batchnorm(model)[0]) is nn.BatchNorm3d


@pytest.mark.parametrize("make", [lambda: syncbn.SyncBatchNorm(3), lambda: nn.SyncBatchNorm(3)], ids=["ours", "torch"])
def test_revert_without_known_dimensionality_gives_batchnorm_of_any_rank(make):
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(make()))
    syncbn.convert_sync_batchnorm(model)
    old = model[1][0]
    syncbn.revert_sync_batchnorm(model)  # no forward pass needed
    new = model[1][0]
    assert type(model[0]) is nn.BatchNorm2d and type(new) is syncbn.nn.BatchNormXd
    _assert_same_objects(old, new)
    new.eval()
    for shape in [(4, 3), (4, 3, 5), (2, 3, 4, 4), (2, 3, 2, 2, 2)]:
        x = torch.randn(shape)
        assert torch.equal(new(x), F.batch_norm(x, new.running_mean, new.running_var, new.weight, new.bias))
    with pytest.raises(ValueError, match="expected 2D to 5D input"):
        new(torch.randn(3))


def test_batchnorm_dim_picks_the_class_and_a_bad_one_is_a_clear_error():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(syncbn.SyncBatchNorm(3)))
    syncbn.convert_sync_batchnorm(model)
    converted = model[0]
    model[1][0].batchnorm_dim = 4
    with pytest.raises(ValueError, match=r"'1\.0' \(syncbn\.nn\.SyncBatchNorm\) has batchnorm_dim 4"):
        syncbn.revert_sync_batchnorm(model)
    assert model[0] is converted  # nothing reverted before the error
    model[1][0].batchnorm_dim = 1
    syncbn.revert_sync_batchnorm(model)
    assert type(model[0]) is nn.BatchNorm2d and type(model[1][0]) is nn.BatchNorm1d


def test_recorded_dimensionality_wins_over_inputs_seen():
    layer = syncbn.convert_sync_batchnorm(nn.BatchNorm2d(3))
    layer(torch.randn(4, 3))  # syncbn accepts any rank; the original class decides
    assert type(syncbn.revert_sync_batchnorm(layer)) is nn.BatchNorm2d


def test_revert_leaves_torch_syncbn_and_warns_for_own_forward_subclass():
    class MySync(syncbn.SyncBatchNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.SyncBatchNorm(3), MySync(3))
    model[1].batchnorm_dim = 2
    keep = list(model)
    with pytest.warns(UserWarning, match=r"left 1 .*MySync at '1'$"):
        syncbn.revert_sync_batchnorm(model)
    assert list(model) == keep


def test_mixed_model_convert_then_revert_round_trip():
    model = _randomize(Mixed())
    model.train()
    model.eval_part.eval()  # an eval sub-module inside a training model
    before = _snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    syncbn.convert_sync_batchnorm(model)
    after_convert = _snapshot(model)
    bn_paths = list(before)
    for path in bn_paths:
        layer = model.get_submodule(path)
        assert type(layer) is syncbn.SyncBatchNorm, path
    # identity, flags (training, frozen included), requires_grad, qconfig and values unchanged
    _assert_snapshot_equal(before, after_convert)

    image, video = _inputs()
    frozen_state = {k: v.clone() for k, v in model.frozen[0].state_dict().items()}
    model(image, video).sum().backward()
    opt.step()
    # the frozen layer stayed in eval mode: its statistics did not move
    for k, v in model.frozen[0].state_dict().items():
        assert torch.equal(v, frozen_state[k]), k
    after_step = _snapshot(model)

    syncbn.revert_sync_batchnorm(model)
    expected = {
        "bn2": nn.BatchNorm2d,
        "head.1": nn.BatchNorm1d,
        "video.1": nn.BatchNorm3d,
        "torch_sync": nn.BatchNorm2d,  # from the 4-D input it saw after conversion
        "frozen.0": nn.BatchNorm2d,
        "no_grad_bn": nn.BatchNorm1d,
        "eval_part.0": nn.BatchNorm2d,
        "no_bias": nn.BatchNorm2d,
    }
    assert {p: type(model.get_submodule(p)) for p in bn_paths} == expected
    _assert_snapshot_equal(after_step, _snapshot(model))
    assert is_frozen(model.frozen[0])
    model.train()
    assert model.frozen[0].training is False and model.eval_part[0].training is True


# ---------------------------------------------------------------------------------------------
# freeze_batchnorm / unfreeze_batchnorm


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.BatchNorm2d(3), (4, 3, 2, 2)),
        (lambda: nn.SyncBatchNorm(3), (4, 3, 2, 2)),
        (lambda: syncbn.SyncBatchNorm(3), (4, 3, 2, 2)),
        (lambda: nn.BatchNorm1d(3, momentum=None), (4, 3)),
    ],
)
def test_frozen_layer_stays_in_eval_and_keeps_its_statistics(make, shape):
    model = nn.Sequential(nn.Identity(), _randomize(make()))
    syncbn.freeze_batchnorm(model)
    bn = model[1]
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    for _ in range(2):
        model.train()
        assert model.training and model[0].training and not bn.training
        x = torch.randn(shape) * 3 + 1
        out = model(x)
        expected = F.batch_norm(
            x, state["running_mean"], state["running_var"], state["weight"], state["bias"], False, 0.0, bn.eps
        )
        torch.testing.assert_close(out, expected)  # normalized with the running statistics
    bn.train()  # directly on the layer, too
    assert not bn.training
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("requires_grad", [False, True])
def test_freeze_sets_requires_grad_and_unfreeze_restores_it(requires_grad):
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm1d(3), nn.Linear(3, 3))
    model[1].bias.requires_grad_(False)  # already off before freezing
    syncbn.freeze_batchnorm(model, requires_grad=requires_grad)
    for bn in model[:2]:
        assert bn.weight.requires_grad is requires_grad and bn.bias.requires_grad is requires_grad
    assert model[2].weight.requires_grad  # not a BatchNorm: untouched
    syncbn.freeze_batchnorm(model, requires_grad=False)  # freezing again keeps the first record
    syncbn.unfreeze_batchnorm(model)
    assert model[0].weight.requires_grad and model[0].bias.requires_grad
    assert model[1].weight.requires_grad and not model[1].bias.requires_grad
    assert not any(is_frozen(m) for m in model.modules())


def test_unfreeze_follows_the_model_mode_from_the_next_train_call():
    model = nn.Sequential(nn.BatchNorm2d(3))
    model.train()
    syncbn.freeze_batchnorm(model)
    syncbn.unfreeze_batchnorm(model)
    assert not model[0].training  # unchanged until the next train()/eval()
    model.train()
    assert model[0].training
    model.eval()
    assert not model[0].training
    assert "train" not in model[0].__dict__


def test_unfreeze_leaves_unfrozen_layers_alone():
    bn = nn.BatchNorm2d(3)
    bn.weight.requires_grad_(False)
    syncbn.unfreeze_batchnorm(nn.Sequential(bn))
    assert bn.weight.requires_grad is False


def test_freeze_returns_module_and_rejects_non_bool():
    bn = nn.BatchNorm2d(3)
    assert syncbn.freeze_batchnorm(bn) is bn and is_frozen(bn)
    assert syncbn.unfreeze_batchnorm(bn) is bn and not is_frozen(bn)
    with pytest.raises(TypeError):
        syncbn.freeze_batchnorm(bn, requires_grad=1)


def test_frozen_norm_act_layer_children_follow_the_model():
    model = nn.Sequential(BatchNormAct2d(3))
    model[0].act = nn.Dropout()
    syncbn.freeze_batchnorm(model)
    model.train()
    assert not model[0].training and model[0].act.training
    model.eval()
    assert not model[0].act.training


@pytest.mark.parametrize("when", ["before", "after"])
def test_freeze_before_or_after_conversion(when):
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3))
    if when == "before":
        syncbn.freeze_batchnorm(model[0])
    syncbn.convert_sync_batchnorm(model)
    if when == "after":
        syncbn.freeze_batchnorm(model[0])
    bn = model[0]
    assert isinstance(bn, syncbn.SyncBatchNorm) and is_frozen(bn)
    assert bn.__dict__["train"].module is bn  # bound to the new layer, not the old one
    model.train()
    assert not bn.training and model[1].training
    assert not bn.weight.requires_grad and model[1].weight.requires_grad
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, 2, 2) + 5)
    assert torch.equal(bn.running_mean, before)
    reverted = syncbn.revert_sync_batchnorm(model)[0]
    assert type(reverted) is nn.BatchNorm2d and is_frozen(reverted)
    assert reverted.__dict__["train"].module is reverted
    syncbn.unfreeze_batchnorm(model)
    assert reverted.weight.requires_grad


def _check_frozen_copy(model: nn.Module, copied: nn.Module) -> None:
    for a, b in zip(model.modules(), copied.modules()):
        assert type(a) is type(b)
        assert is_frozen(a) == is_frozen(b)
        if is_frozen(b):
            assert b.__dict__["train"].module is b  # not the original layer
            assert b.weight.requires_grad is a.weight.requires_grad
    copied.train()
    assert [m.training for m in copied.modules()] == [not is_frozen(m) for m in copied.modules()]
    model.eval()  # the copy is independent of the original
    assert copied.training


def _mixed_frozen(convert: bool) -> nn.Module:
    model = _randomize(Mixed())
    syncbn.freeze_batchnorm(model.head)
    if convert:
        syncbn.convert_sync_batchnorm(model)
    model.train()
    return model


@pytest.mark.parametrize("convert", [False, True])
def test_freezing_survives_deepcopy(convert):
    model = _mixed_frozen(convert)
    _check_frozen_copy(model, copy.deepcopy(model))


@pytest.mark.parametrize("convert", [False, True])
def test_freezing_survives_pickle_and_torch_save(convert):
    model = _mixed_frozen(convert)
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        _check_frozen_copy(model, pickle.loads(pickle.dumps(model, protocol=protocol)))
        model.train()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    _check_frozen_copy(model, loaded)
    image, video = _inputs()
    model.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(image, video), model(image, video), rtol=0, atol=0)


def test_freezing_is_configuration_not_state():
    frozen = _randomize(Mixed(), seed=1)
    syncbn.freeze_batchnorm(frozen)
    plain = Mixed()
    syncbn.unfreeze_batchnorm(plain)
    assert list(frozen.state_dict()) == list(plain.state_dict())
    assert not any(k.endswith("_extra_state") for k in frozen.state_dict())
    # a frozen model's state_dict loads into an unfrozen one, and back; freezing stays as it was
    plain.load_state_dict(frozen.state_dict())
    assert not any(is_frozen(m) for m in plain.modules())
    for k, v in frozen.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k
    other = _randomize(Mixed(), seed=2).state_dict()
    frozen.load_state_dict(other)
    assert all(is_frozen(m) for m in frozen.modules() if isinstance(m, _BatchNorm))
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, other[k]), k


# ---------------------------------------------------------------------------------------------
# Checkpoints

LAYER_KINDS = {
    "nn.BatchNorm2d": lambda: nn.BatchNorm2d(6),
    "torch.nn.SyncBatchNorm": lambda: nn.SyncBatchNorm(6),
    "syncbn.SyncBatchNorm": lambda: syncbn.SyncBatchNorm(6),
}


@pytest.mark.parametrize("src", list(LAYER_KINDS))
@pytest.mark.parametrize("dst", list(LAYER_KINDS))
def test_state_dict_loads_across_layer_kinds(src, dst):
    source = _randomize(LAYER_KINDS[src](), seed=3)
    target = LAYER_KINDS[dst]()
    state = source.state_dict()
    assert list(state) == BN_STATE_KEYS
    buffer = io.BytesIO()
    torch.save(state, buffer)  # through a file, as checkpoints go
    buffer.seek(0)
    result = target.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in state.items():
        assert torch.equal(target.state_dict()[k], v), k
    x = torch.randn(3, 6, 2, 2)
    torch.testing.assert_close(target.eval()(x), source.eval()(x), rtol=0, atol=0)


def test_syncbn_state_dict_keys_match_batchnorm2d_when_frozen_and_converted():
    layer = syncbn.convert_sync_batchnorm(nn.BatchNorm2d(4))
    syncbn.freeze_batchnorm(layer)
    layer(torch.randn(2, 4, 2, 2))
    assert list(layer.state_dict()) == list(nn.BatchNorm2d(4).state_dict()) == BN_STATE_KEYS


def test_whole_converted_model_saves_and_loads():
    model = _randomize(Mixed())
    syncbn.convert_sync_batchnorm(model)
    image, video = _inputs()
    model(image, video)  # every layer has seen an input
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    for a, b in zip(model.modules(), loaded.modules()):
        if isinstance(a, syncbn.SyncBatchNorm):
            assert (a.batchnorm_dim, a._input_dim) == (b.batchnorm_dim, b._input_dim)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    loaded.train()
    model.train()
    torch.testing.assert_close(loaded(image, video), model(image, video), rtol=0, atol=0)
    # and it still reverts to the right classes after loading
    assert type(syncbn.revert_sync_batchnorm(loaded).torch_sync) is nn.BatchNorm2d


def test_create_syncbn_process_group_needs_an_initialized_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        syncbn.create_syncbn_process_group(2)
