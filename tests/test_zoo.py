"""Real models of the model zoos, every BatchNorm synchronized exactly: 2 gloo ranks, float64.

    python -m pytest -q tests/test_zoo.py

For each model (torchvision, timm, segmentation-models-pytorch, MONAI, mmengine), random-init:

- census: which BatchNorm classes it has, and what conversion makes of every one (no warning);
- one training step on 2 ranks (2 and 3 samples) against the unconverted model on the
  concatenated 5-sample batch in one process: each rank's output rows, the parameter gradients
  summed over ranks, the running statistics (the same on both ranks);
- the state_dict both ways between the converted and an unconverted model, and eval outputs
  bitwise equal;
- revert: every layer back to exactly its class, holding the same tensors;
- ``torch.export`` of the reverted model.

Rank 1 computes the reference while rank 0 reverts and exports. The layer-level checks of the
timm, mmengine and import rules are single-process, at the end.
"""

from __future__ import annotations

import collections
import copy
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import syncbn
from syncbn.nn import BatchNormXd
from tests import procs

SIZES = (2, 3)  # samples on rank 0 and rank 1
# float64 end to end: what is left is summation order (about 1e-13 of each tensor's scale).
TOL = 1e-9


def _resnet50() -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(num_classes=10)


def _r3d_18() -> nn.Module:
    import torchvision

    return torchvision.models.video.r3d_18(num_classes=10)


def _timm(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, num_classes=10, drop_rate=0.0, drop_path_rate=0.0)


def _smp_unet() -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet18", encoder_weights=None, classes=2)


def _monai_unet() -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=(4, 8, 16),
        strides=(2, 2),
        num_res_units=1,
        norm="batch",
    )


def _mmengine_net() -> nn.Module:
    """An mmengine model as mmengine's runner leaves it on one device: SyncBN -> _BatchNormXd."""
    from mmengine.model import BaseModel, revert_sync_batchnorm

    class Net(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SyncBatchNorm(8), nn.ReLU())
            self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.SyncBatchNorm(16), nn.ReLU())
            self.head = nn.Sequential(nn.Linear(16, 10), nn.SyncBatchNorm(10))  # 2-D input

        def forward(self, inputs, data_samples=None, mode="tensor"):
            return self.head(self.down(self.stem(inputs)).mean((2, 3)))

    return revert_sync_batchnorm(Net())


@dataclass(frozen=True)
class Model:
    build: object
    args: tuple
    sample: tuple[int, ...]  # one sample's shape
    census: dict[str, int]  # BatchNorm classes -> count, before conversion
    converted: dict[str, int]  # after conversion: syncbn class (and activation) -> count


MODELS = {
    "torchvision.resnet50": Model(_resnet50, (), (3, 32, 32), {"BatchNorm2d": 53}, {"SyncBatchNorm": 53}),
    "torchvision.r3d_18": Model(_r3d_18, (), (3, 4, 16, 16), {"BatchNorm3d": 20}, {"SyncBatchNorm": 20}),
    "timm.efficientnet_b0": Model(
        _timm, ("efficientnet_b0",), (3, 32, 32), {"BatchNormAct2d": 49},
        {"SyncBatchNormAct/silu": 33, "SyncBatchNormAct/identity": 16},
    ),
    "timm.mobilenetv3_large_100": Model(
        _timm, ("mobilenetv3_large_100",), (3, 32, 32), {"BatchNormAct2d": 46},
        {"SyncBatchNormAct/hardswish": 20, "SyncBatchNormAct/relu": 11, "SyncBatchNormAct/identity": 15},
    ),
    "timm.regnety_002": Model(
        _timm, ("regnety_002",), (3, 32, 32), {"BatchNormAct2d": 44},
        {"SyncBatchNormAct/relu": 27, "SyncBatchNormAct/identity": 17},
    ),
    "smp.Unet": Model(_smp_unet, (), (3, 64, 64), {"BatchNorm2d": 30}, {"SyncBatchNorm": 30}),
    "monai.UNet3d": Model(_monai_unet, (), (1, 16, 16, 16), {"BatchNorm3d": 6}, {"SyncBatchNorm": 6}),
    "mmengine.BaseModel": Model(_mmengine_net, (), (3, 16, 16), {"_BatchNormXd": 3}, {"SyncBatchNorm": 3}),
}  # fmt: skip


def _census(model: nn.Module) -> dict[str, int]:
    counts = collections.Counter()
    for layer in model.modules():
        if isinstance(layer, _BatchNorm):
            name = type(layer).__name__
            if isinstance(layer, syncbn.SyncBatchNormAct):
                name += f"/{layer.activation}"
            counts[name] += 1
    return dict(counts)


def _tensor_ids(layer: nn.Module) -> dict[str, int]:
    return {k: id(t) for k, t in {**layer._parameters, **layer._buffers}.items()}


def _flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _worst_error(named: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest error relative to the tensor's own scale, and where.

    The scale is at least a thousandth of the model's largest gradient: the gradient of a bias
    right before a BatchNorm is zero in theory, and both sides hold rounding noise of about
    1e-14 of the largest gradient.
    """
    floor = 1e-3 * max(t.abs().max().item() for t in ref.values())
    worst = (0.0, "")
    for name, value in named.items():
        scale = max(ref[name].abs().max().item(), floor)
        worst = max(worst, ((value - ref[name]).abs().max().item() / scale, name))
    return worst


def _case_train_step(ctx, name: str) -> dict:
    spec = MODELS[name]
    torch.manual_seed(0)
    model = spec.build(*spec.args).double()
    reference = copy.deepcopy(model)
    classes = {path: type(layer) for path, layer in model.named_modules()}
    keys = list(model.state_dict())
    census = _census(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer converts, silently
        syncbn.convert_sync_batchnorm(model, process_group=ctx.group)
    result = {"census": census, "converted": _census(model), "keys_kept": list(model.state_dict()) == keys}

    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn((sum(SIZES), *spec.sample), generator=gen, dtype=torch.float64)
    start = sum(SIZES[: ctx.rank])
    x = x_all[start : start + SIZES[ctx.rank]]
    model.train()
    out = model(x)
    grad_all = torch.randn((sum(SIZES), *out.shape[1:]), generator=gen, dtype=torch.float64)
    (out * grad_all[start : start + SIZES[ctx.rank]]).sum().backward()
    grads = _flat_grads(model)
    dist.all_reduce(grads, group=ctx.group)  # the gradient of the sum of the ranks' losses
    result["out"] = out.detach()
    result["stats"] = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}

    if ctx.rank == 1:
        reference.train()
        ref_out = reference(x_all)
        (ref_out * grad_all).sum().backward()
        names = [n for n, _ in reference.named_parameters()]
        result["ref_out"] = ref_out.detach()
        result["ref_stats"] = {k: v for k, v in reference.state_dict().items() if k in result["stats"]}
        result["grad_error"] = _worst_error(
            dict(zip(names, grads.split([p.numel() for p in model.parameters()]))),
            dict(zip(names, _flat_grads(reference).split([p.numel() for p in reference.parameters()]))),
        )
        return result

    # rank 0: checkpoints both ways, eval outputs, revert, export
    state = model.state_dict()
    plain = spec.build(*spec.args).double()
    plain.load_state_dict(state)  # strict: converted -> unconverted
    model.load_state_dict(plain.state_dict())  # and back
    result["state_equal"] = all(torch.equal(plain.state_dict()[k], v) for k, v in state.items())
    model.eval()
    plain.eval()
    with torch.no_grad():
        result["eval_bitwise"] = torch.equal(model(x), plain(x))
    layers = {path: layer for path, layer in model.named_modules() if isinstance(layer, syncbn.SyncBatchNorm)}
    tensors = {path: _tensor_ids(layer) for path, layer in layers.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        syncbn.revert_sync_batchnorm(model)
    result["class_changed"] = [
        f"{path}: {classes[path].__name__} -> {type(layer).__name__}"
        for path, layer in model.named_modules()
        if type(layer) is not classes.get(path)
    ]
    result["tensors_changed"] = [path for path, ids in tensors.items() if _tensor_ids(model.get_submodule(path)) != ids]
    exported = torch.export.export(model, (x,), strict=False)
    with torch.no_grad():
        result["export_error"] = (exported.module()(x) - model(x)).abs().max().item()
    return result


@pytest.mark.parametrize("name", list(MODELS))
def test_model_trains_exactly_like_one_big_batch(pool, name):
    spec = MODELS[name]
    rank0, rank1 = pool.run(_case_train_step, group="w2", args=(name,), timeout=180)
    assert rank0["census"] == spec.census
    assert rank0["converted"] == spec.converted
    assert rank0["keys_kept"]

    ref_rows = rank1["ref_out"].split(SIZES)
    for rank, result in enumerate((rank0, rank1)):
        torch.testing.assert_close(result["out"], ref_rows[rank], rtol=TOL, atol=TOL * ref_rows[rank].abs().max())
    err, where = rank1["grad_error"]
    assert err < TOL, f"summed gradient of {where}: error {err:.2e} of its scale"
    for k, ref in rank1["ref_stats"].items():
        assert torch.equal(rank0["stats"][k], rank1["stats"][k]), f"{k} differs between ranks"
        torch.testing.assert_close(rank0["stats"][k], ref, rtol=TOL, atol=TOL * max(ref.abs().max().item(), 1.0))

    assert rank0["state_equal"]
    assert rank0["eval_bitwise"]
    assert rank0["class_changed"] == []
    assert rank0["tensors_changed"] == []
    assert rank0["export_error"] <= 1e-12


# ---------------------------------------------------------------------------------------------
# timm's BatchNorm + activation layers, one by one


def _timm_layers() -> dict[str, nn.Module]:
    from timm.layers import BatchNormAct2d

    return {
        "relu": BatchNormAct2d(4),
        "silu": BatchNormAct2d(4, act_layer=nn.SiLU),
        "hardswish": BatchNormAct2d(4, act_layer="hard_swish"),
        "leaky_relu": BatchNormAct2d(4, act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.2}),
        "elu": BatchNormAct2d(4, act_layer=nn.ELU, act_kwargs={"alpha": 0.5}),
        "gelu": BatchNormAct2d(4, act_layer=nn.GELU),
        "identity": BatchNormAct2d(4, apply_act=False),
        # no entry in the activation table: the act runs as a module (PReLU's weight included)
        "gelu_tanh": BatchNormAct2d(4, act_layer=nn.GELU, act_kwargs={"approximate": "tanh"}),
        "prelu": BatchNormAct2d(4, act_layer=nn.PReLU),
        "mish": BatchNormAct2d(4, act_layer="mish"),
        # a dropout between the normalization and the activation
        "dropout+relu": BatchNormAct2d(4, drop_layer=nn.Dropout),
    }


_UNNAMED = {"gelu_tanh", "prelu", "mish"}


def _randomized(layer: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in (layer.weight, layer.bias, layer.running_mean):
            t.copy_(torch.randn(t.shape, generator=gen))
        layer.running_var.copy_(torch.rand(4, generator=gen) + 0.5)
    return layer


@pytest.mark.parametrize("kind", list(_timm_layers()))
def test_timm_batchnorm_act_converts_keeping_everything(kind):
    old = _randomized(_timm_layers()[kind])
    children = dict(old._modules)
    tensors = _tensor_ids(old)
    keys = list(old.state_dict())
    x = torch.randn(3, 4, 5, 5) * 3
    old.eval()
    expected = old(x)
    old.train()

    new = syncbn.convert_sync_batchnorm(nn.Sequential(old))[0]
    assert type(new) is syncbn.SyncBatchNormAct
    assert new.activation == ("identity" if kind in _UNNAMED else kind.split("+")[-1])
    assert new.apply_act_module == (kind in _UNNAMED)
    if kind == "leaky_relu":
        assert new.activation_param == 0.2
    if kind == "elu":
        assert new.activation_param == 0.5
    assert _tensor_ids(new) == tensors and dict(new._modules) == children  # same objects
    assert list(new.state_dict()) == keys  # timm's keys (act.weight for PReLU)
    new.eval()
    assert torch.equal(new(x), expected)  # bitwise

    new.train()
    torch.manual_seed(0)
    y_new = new(x)
    back = syncbn.revert_sync_batchnorm(nn.Sequential(new))[0]
    assert type(back) is type(old) and dict(back._modules) == children and _tensor_ids(back) == tensors
    torch.manual_seed(0)
    torch.testing.assert_close(y_new, back(x), rtol=1e-5, atol=1e-5)  # the same training-mode layer


def test_timm_sync_batchnorm_act_converts_and_reverts_to_batchnorm_act2d():
    from timm.layers import BatchNormAct2d, SyncBatchNormAct
    from timm.layers import convert_sync_batchnorm as timm_convert

    model = nn.Sequential(BatchNormAct2d(4, act_layer=nn.SiLU), nn.BatchNorm2d(4))
    timm_convert(model)  # what timm's docs advise: torch's GPU-only layers
    assert type(model[0]) is SyncBatchNormAct and type(model[1]) is nn.SyncBatchNorm
    act = model[0].act
    syncbn.convert_sync_batchnorm(model)
    assert type(model[0]) is syncbn.SyncBatchNormAct and model[0].activation == "silu" and model[0].act is act
    assert type(model[1]) is syncbn.SyncBatchNorm
    model(torch.randn(3, 4, 2, 2))  # trains on CPU
    syncbn.revert_sync_batchnorm(model)
    assert type(model[0]) is BatchNormAct2d and model[0].act is act
    assert type(model[1]) is nn.BatchNorm2d  # the input rank it saw


def test_timm_sync_batchnorm_act_without_children_reverts_to_a_working_layer():
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    layer = syncbn.convert_sync_batchnorm(SyncBatchNormAct(4))  # built directly: no drop, no act
    assert layer.activation == "identity" and not layer.apply_act_module
    back = syncbn.revert_sync_batchnorm(layer)
    assert type(back) is BatchNormAct2d
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(back(x), nn.functional.batch_norm(x, None, None, back.weight, back.bias, True))


# ---------------------------------------------------------------------------------------------
# mmengine's converters next to syncbn's


def test_mmengine_converter_then_syncbn_is_right():
    from mmengine.model import convert_sync_batchnorm as mm_convert
    from mmengine.model.utils import _BatchNormXd

    model = nn.Sequential(nn.BatchNorm2d(4), _BatchNormXd(4), nn.BatchNorm1d(4))
    model = syncbn.convert_sync_batchnorm(mm_convert(model))  # the order the README gives
    assert [type(m) for m in model] == [syncbn.SyncBatchNorm] * 3
    model[2](torch.randn(3, 4))  # only this one has seen an input
    syncbn.revert_sync_batchnorm(model)
    # mmengine's SyncBatchNorm layers do not know their class: the dimensionality decides
    assert [type(m) for m in model] == [BatchNormXd, BatchNormXd, nn.BatchNorm1d]


# ---------------------------------------------------------------------------------------------
# Optional libraries are imported only by those who use them

_IMPORT_CHECK = """
import sys
{block}
import torch, syncbn
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.SyncBatchNorm(4))
syncbn.convert_sync_batchnorm(model)
model(torch.randn(2, 3, 2, 2))
syncbn.revert_sync_batchnorm(model)
syncbn.SyncBatchNormAct(4, activation="silu")(torch.randn(2, 4))
loaded = {{name.split(".")[0] for name, module in sys.modules.items() if module is not None}}
print("zoo modules:", sorted(loaded & {{"timm", "lightning", "mmengine", "mmcv", "torchvision"}}))
"""


@pytest.mark.parametrize("timm_installed", [True, False], ids=["timm-installed", "timm-missing"])
def test_syncbn_imports_no_model_zoo(timm_installed):
    # sys.modules[name] = None makes `import name` fail as if it were not installed
    block = "" if timm_installed else "sys.modules['timm'] = None"
    proc = procs.python("-c", _IMPORT_CHECK.format(block=block), timeout=60)
    assert proc.returncode == 0, proc.stdout
    assert "zoo modules: []" in proc.stdout.splitlines()
