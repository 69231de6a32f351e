"""Activation memory saved for backward: BN + LeakyReLU against SyncBatchNormAct(inplace=True).

    python -m benchmarks.bench_memory [--quick]   # results in benchmarks/results/scratch/
    python -m benchmarks.bench_memory --save      # replaces benchmarks/results/memory.{md,json,png}

One training-mode forward of a DeepLabV3-ResNet50-like segmentation network (ResNet-50
bottlenecks with output stride 8, dilated layer3 and layer4, an ASPP head with rates 12/24/36,
a 3x3 head and bilinear upsampling) built three ways from one definition, the same weights:

  - ``BN + LeakyReLU``: ``nn.BatchNorm2d`` then ``nn.LeakyReLU(inplace=True)``, as model zoos do;
  - ``SyncBatchNormAct``: the fused layer (saves its input only);
  - ``SyncBatchNormAct(inplace=True)``: the in-place layer (saves its output only, written over
    its input), ``activation="identity"`` where a BatchNorm has no activation (before a residual
    addition, in a downsample branch).

Every tensor autograd saves goes through ``torch.autograd.graph.saved_tensors_hooks``; a figure
is the bytes of the distinct storages (deduplicated by storage address: a tensor that a layer
and the next convolution both save counts once), parameters apart. Per BatchNorm unit (the
norm and its activation), the number of activation-sized tensors the unit itself saves. The
count is deterministic: a ``--save`` run is a measurement like any other, on any machine.
On a GPU (``--cuda``, what benchmarks/gpu_check.py runs) also the peak memory allocated by a
forward+backward, larger input, float32 and bfloat16 autocast.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import syncbn
from benchmarks.common import Row, add_output_args, meta, meta_line, new_figure, output_dir, save_figure, write_results

NormAct = Callable[[int, bool], nn.Module]
SLOPE = 0.01
TARGET_REDUCTION = 0.30  # at least 30% less saved activation memory for the whole model


def batchnorm_leaky_relu(channels: int, act: bool) -> nn.Module:
    if not act:
        return nn.BatchNorm2d(channels)
    return nn.Sequential(nn.BatchNorm2d(channels), nn.LeakyReLU(SLOPE, inplace=True))


def fused(channels: int, act: bool) -> nn.Module:
    return syncbn.SyncBatchNormAct(
        channels, activation="leaky_relu" if act else "identity", activation_param=SLOPE if act else None
    )


def inplace(channels: int, act: bool) -> nn.Module:
    activation, param = ("leaky_relu", SLOPE) if act else ("identity", None)
    return syncbn.SyncBatchNormAct(channels, activation=activation, activation_param=param, inplace=True)


NETWORKS: dict[str, NormAct] = {
    "BN + LeakyReLU": batchnorm_leaky_relu,
    "SyncBatchNormAct": fused,
    "SyncBatchNormAct(inplace=True)": inplace,
}


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck (torchvision's): conv, BN + act twice, conv, BN, add, act."""

    def __init__(self, norm_act: NormAct, cin: int, planes: int, stride: int, dilation: int, downsample: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = norm_act(planes, True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_act(planes, True)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = norm_act(4 * planes, False)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, 4 * planes, 1, stride, bias=False), norm_act(4 * planes, False))
            if downsample
            else None
        )
        self.act = nn.LeakyReLU(SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        # Not ``out += identity``: the in-place layer saved ``out`` for its backward.
        return self.act(out + identity)


class PreActBottleneck(nn.Module):
    """The pre-activation bottleneck (ResNet v2, the residual blocks of InPlace-ABN's models):
    BN + act before each conv, the sum of the branches left as it is."""

    def __init__(self, norm_act: NormAct, cin: int, planes: int, stride: int, dilation: int, downsample: bool):
        super().__init__()
        self.bn1 = norm_act(cin, True)
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn2 = norm_act(planes, True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn3 = norm_act(planes, True)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.projection = nn.Conv2d(cin, 4 * planes, 1, stride, bias=False) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.projection is None:
            # The in-place layer writes over x, which the sum still needs (a copy that is not saved).
            shortcut = x.clone() if getattr(self.bn1, "inplace", False) else x
            out = self.bn1(x)
        else:
            out = self.bn1(x)
            shortcut = self.projection(out)
        return self.conv3(self.bn3(self.conv2(self.bn2(self.conv1(out))))) + shortcut


class ASPP(nn.Module):
    def __init__(self, norm_act: NormAct, cin: int, rates: tuple[int, ...], cout: int = 256):
        super().__init__()
        self.branches = nn.ModuleList([nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), norm_act(cout, True))])
        for rate in rates:
            conv = nn.Conv2d(cin, cout, 3, padding=rate, dilation=rate, bias=False)
            self.branches.append(nn.Sequential(conv, norm_act(cout, True)))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), norm_act(cout, True))
        self.project = nn.Sequential(
            nn.Conv2d((len(rates) + 2) * cout, cout, 1, bias=False), norm_act(cout, True), nn.Dropout(0.5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3Like(nn.Module):
    """DeepLabV3 with a ResNet-50 backbone at output stride 8, with ``norm_act`` for every BatchNorm.

    ``preact``: the pre-activation (v2) backbone, with a final BN + act after layer4.
    """

    def __init__(self, norm_act: NormAct, preact: bool = False, classes: int = 21):
        super().__init__()
        block = PreActBottleneck if preact else Bottleneck
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, padding=3, bias=False), norm_act(64, True), nn.MaxPool2d(3, 2, padding=1)
        )
        layers, cin, dilation = [], 64, 1
        for planes, blocks, stride, dilate in (
            (64, 3, 1, False),
            (128, 4, 2, False),
            (256, 6, 2, True),
            (512, 3, 2, True),
        ):
            if dilate:  # replace the stride by a dilation (output stride 8)
                dilation, stride = dilation * stride, 1
            blocks_ = [block(norm_act, cin, planes, stride, dilation, downsample=True)]
            blocks_ += [block(norm_act, 4 * planes, planes, 1, dilation, downsample=False) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*blocks_))
            cin = 4 * planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        if preact:  # the blocks end on a sum: one BN + act before the head, as ResNet v2
            self.layer4.append(norm_act(cin, True))
        self.aspp = ASPP(norm_act, cin, (12, 24, 36))
        self.head = nn.Sequential(
            nn.Conv2d(256, 256, 3, padding=1, bias=False), norm_act(256, True), nn.Conv2d(256, classes, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        features = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return F.interpolate(self.head(self.aspp(features)), size=size, mode="bilinear", align_corners=False)


def build(norm_act: NormAct, preact: bool = False, seed: int = 0) -> DeepLabV3Like:
    """The network with ``norm_act``; the same weights for every ``norm_act`` (the same seed and
    order of parameter creation, BatchNorm weights and biases reset alike)."""
    torch.manual_seed(seed)
    model = DeepLabV3Like(norm_act, preact)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


def norm_units(model: nn.Module) -> dict[str, nn.Module]:
    """Every BatchNorm unit by name: the norm, with its activation when it has one."""
    units = {}
    for name, m in model.named_modules():
        pair = isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[1], nn.LeakyReLU)
        if pair and isinstance(m[0], _BatchNorm):
            units[name] = m
        elif isinstance(m, _BatchNorm) and not any(name.startswith(u + ".") for u in units):
            units[name] = m
    return units


def saved_for_backward(model: nn.Module, x: torch.Tensor) -> dict:
    """One training-mode forward under saved_tensors_hooks: what autograd keeps for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    units = norm_units(model)
    running: list[str] = []
    storages: dict[int, int] = {}  # storage address -> bytes
    per_unit: dict[str, list[int]] = {name: [] for name in units}  # numel of what each unit saves
    sizes: dict[str, int] = {}  # numel of each unit's input

    def enter(name: str, args: tuple) -> None:
        running.append(name)
        sizes[name] = args[0].numel()

    handles = []
    for name, unit in units.items():
        handles.append(unit.register_forward_pre_hook(lambda m, args, name=name: enter(name, args)))
        handles.append(unit.register_forward_hook(lambda m, args, out: running.pop() and None))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        if running:
            per_unit[running[-1]].append(t.numel())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    activation_bytes = sum(b for ptr, b in storages.items() if ptr not in params)
    counts = {name: sum(1 for n in numels if n == sizes[name]) for name, numels in per_unit.items()}
    return {
        "output": out.detach(),
        "saved_bytes": sum(storages.values()),
        "activation_bytes": activation_bytes,
        "parameter_bytes": sum(storages.values()) - activation_bytes,
        "per_unit": counts,
        "fused_units": [name for name, unit in units.items() if _has_activation(unit)],
    }


def _has_activation(unit: nn.Module) -> bool:
    if isinstance(unit, syncbn.SyncBatchNormAct):
        return unit.activation != "identity"
    return isinstance(unit, nn.Sequential)


BACKBONES = {"post-activation": False, "pre-activation": True}  # ResNet-50 v1 (torchvision's), v2


def measure(batch: int, size: int) -> list[Row]:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    rows = []
    for backbone, preact in BACKBONES.items():
        outputs = {}
        for provider, norm_act in NETWORKS.items():
            model = build(norm_act, preact).train()
            torch.manual_seed(3)  # the same dropout mask for every network
            result = saved_for_backward(model, x.clone())
            outputs[provider] = result.pop("output")
            fused = result.pop("fused_units")
            counts = result.pop("per_unit")
            with_act = [counts[n] for n in fused]
            without_act = [c for n, c in counts.items() if n not in fused]
            rows.append(Row.measured(
                None, provider, "forward (saved for backward)", shape=tuple(x.shape), dtype="float32",
                layout="contiguous", device="cpu", backbone=backbone, **result,
                units_with_activation=len(with_act), saved_per_unit_with_activation=sorted(set(with_act)),
                saved_per_unit_without=sorted(set(without_act)), per_unit=counts,
            ))  # fmt: skip
            print(f"{backbone:<16} {provider:<32} saved activations {result['activation_bytes'] / 2**20:7.1f} MiB "
                  f"(+ {result['parameter_bytes'] / 2**20:.1f} MiB parameters); per unit with an activation: "
                  f"{sorted(set(with_act))}", flush=True)  # fmt: skip
        reference = outputs["BN + LeakyReLU"]
        for row, out in zip(rows[-len(NETWORKS) :], outputs.values()):  # the same network: the same output
            row.extras["max_output_difference"] = (out - reference).abs().max().item() / reference.abs().max().item()
    return rows


def _by_backbone(rows: list[Row]) -> dict[str, list[Row]]:
    return {b: [r for r in rows if r.extras["backbone"] == b] for b in BACKBONES}


def report(rows: list[Row], out_dir: Path, quick: bool) -> Path:
    m = meta(dtype="float32")
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    lines = [
        "# Activation memory saved for backward: BN + LeakyReLU against SyncBatchNormAct(inplace=True)",
        "",
        f"{meta_line(m)} Reproduce: `python -m benchmarks.bench_memory{' --quick' if quick else ' --save'}`.",
        "",
        f"A DeepLabV3-ResNet50-like network (output stride 8, ASPP, {rows[0].shape} input, training mode, "
        "float32), one forward: the bytes of the distinct storages autograd saves for backward "
        "(`torch.autograd.graph.saved_tensors_hooks`, deduplicated by storage), parameters apart. "
        "A unit is a BatchNorm with its activation; the counts are the activation-sized tensors the "
        "unit itself saves. Two backbones: ResNet-50 as torchvision builds it (post-activation: "
        "conv, BN + act, conv, BN + act, conv, BN, add, act) and its pre-activation form (ResNet "
        "v2, the residual blocks of InPlace-ABN's own models: BN + act before every conv).",
        "",
        "| backbone | network | saved activations (MiB) | vs BN + LeakyReLU | parameters (MiB) "
        "| saved per unit with an activation | per unit without | output vs BN + LeakyReLU |",
        "|---|---|---:|---:|---:|---|---|---:|",
    ]
    for backbone, group in _by_backbone(rows).items():
        base = group[0].extras["activation_bytes"]
        for r in group:
            e = r.extras
            lines.append(
                f"| {backbone} | {r.provider} | {mib(e['activation_bytes'])} | {e['activation_bytes'] / base:.2f} | "
                f"{mib(e['parameter_bytes'])} | {e['saved_per_unit_with_activation']} "
                f"({e['units_with_activation']} units) | {e['saved_per_unit_without']} | "
                f"{e['max_output_difference']:.1e} |"
            )
    lines += ["", "## Targets", "", "| target | backbone | measured | met |", "|---|---|---|---|"]
    for backbone, group in _by_backbone(rows).items():
        base, inplace_row = group[0].extras, group[-1].extras
        reduction = 1 - inplace_row["activation_bytes"] / base["activation_bytes"]
        per_unit = inplace_row["saved_per_unit_with_activation"], base["saved_per_unit_with_activation"]
        lines += [
            f"| >= {TARGET_REDUCTION:.0%} less saved activation memory for the whole model | {backbone} | "
            f"{reduction:.1%} less | {'yes' if reduction >= TARGET_REDUCTION else 'no'} |",
            f"| 1 activation saved per BN + activation unit instead of 2 | {backbone} | {per_unit[0]} instead "
            f"of {per_unit[1]} | {'yes' if per_unit == ([1], [2]) else 'no'} |",
        ]
    lines += [
        "",
        "In the post-activation bottleneck the two largest tensors (4x the width of the others) sit "
        "around the residual sum: the output of the last BatchNorm, which has no activation of its "
        "own, and the activated sum. Both stay saved whichever layer is used (the in-place layer "
        "keeps the first instead of its input; the sum's activation keeps the second), so only the "
        "two narrow BN + act units of each block shrink. The pre-activation form puts every "
        "BatchNorm before an activation, and each unit then keeps one tensor instead of two.",
        "",
        "The fused layer (not in place) saves its input, as SyncBatchNorm does: with an in-place "
        "LeakyReLU the pair saves that and its output, which the next convolution saves anyway, so "
        "the two keep the same storages here. It saves less than the pair where the activation's "
        "backward needs its input (silu, gelu, hardswish).",
    ]
    plot(rows, out_dir / "memory.png", m)
    return write_results("memory", m, rows, lines, out_dir)


def plot(rows: list[Row], path: Path, m: dict) -> None:
    fig, ax = new_figure(figsize=(9, 4))
    labels, values, colors = [], [], []
    palette = ["#999999", "#4c72b0", "#55a868"]
    for backbone, group in _by_backbone(rows).items():
        for color, r in zip(palette, group):
            labels.append(f"{backbone}: {r.provider}")
            values.append(r.extras["activation_bytes"] / 2**20)
            colors.append(color)
    bars = ax.barh(labels, values, color=colors)
    for i, (bar, v) in enumerate(zip(bars, values)):
        base = values[i - i % len(NETWORKS)]
        ax.text(v, bar.get_y() + bar.get_height() / 2, f" {v:.0f} MiB ({v / base:.0%})", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("activation memory saved for backward (MiB)")
    ax.set_xlim(0, max(values) * 1.3)
    ax.set_title(f"DeepLabV3-ResNet50-like, {rows[0].shape} input, float32; torch {m['torch']}", fontsize=9)
    save_figure(fig, path)


def cuda_peak(batch: int, size: int) -> list[Row]:
    """Peak memory allocated by one forward+backward on the GPU, per backbone and network
    (float32, and bfloat16 autocast with channels_last)."""
    device = torch.device("cuda")
    rows = []
    for (backbone, preact), autocast, (provider, norm_act) in itertools.product(
        BACKBONES.items(), (False, True), NETWORKS.items()
    ):
        model = build(norm_act, preact).to(device).train()
        x = torch.randn(batch, 3, size, size, device=device)
        if autocast:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

        def step(model: nn.Module, x: torch.Tensor, autocast: bool) -> int:
            with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
                out = model(x)
            held = torch.cuda.memory_allocated()
            out.float().mean().backward()
            return held

        step(model, x, autocast)  # warm-up: kernels compiled, workspaces allocated
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        held = step(model, x, autocast)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        rows.append(Row.measured(
            None, provider, "forward+backward (peak memory)", shape=tuple(x.shape),
            dtype="bfloat16 autocast" if autocast else "float32", layout="channels_last" if autocast else "contiguous",
            device=torch.cuda.get_device_name(), backbone=backbone, peak_bytes=peak - base,
            held_after_forward_bytes=held - base,
        ))  # fmt: skip
        print(f"{backbone:<16} {rows[-1].dtype:<18} {provider:<32} peak {(peak - base) / 2**30:6.2f} GiB, "
              f"held after forward {(held - base) / 2**30:6.2f} GiB", flush=True)  # fmt: skip
        del model, x
        torch.cuda.empty_cache()
    return rows


def cuda_report(rows: list[Row], out_dir: Path) -> Path:
    m = meta(device=rows[0].device)
    lines = [
        f"# Peak GPU memory of a forward+backward: BN + LeakyReLU against SyncBatchNormAct ({rows[0].device})",
        "",
        f"{meta_line(m)} Reproduce: `python -m benchmarks.bench_memory --cuda`.",
        "",
        "| backbone | dtype | network | peak (GiB) | vs BN + LeakyReLU | held after forward (GiB) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for i, r in enumerate(rows):
        base = rows[i - i % len(NETWORKS)].extras["peak_bytes"]
        e = r.extras
        lines.append(
            f"| {e['backbone']} | {r.dtype} | {r.provider} | {e['peak_bytes'] / 2**30:.2f} | "
            f"{e['peak_bytes'] / base:.2f} | {e['held_after_forward_bytes'] / 2**30:.2f} |"
        )
    return write_results("memory-cuda", m, rows, lines, out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 64x64 input instead of 128x128: a smoke run")
    parser.add_argument("--cuda", action="store_true", help="peak GPU memory of a forward+backward (needs CUDA)")
    add_output_args(parser)
    args = parser.parse_args()
    out = output_dir(parser, args, reduced="--quick" if args.quick else None)
    if args.cuda:
        if not torch.cuda.is_available():
            parser.error("--cuda needs a CUDA device")
        print(f"wrote {cuda_report(cuda_peak(8, 512 if not args.quick else 256), out)}")
        return
    rows = measure(batch=2, size=64 if args.quick else 128)
    print(f"wrote {report(rows, out, args.quick)}")


if __name__ == "__main__":
    main()
