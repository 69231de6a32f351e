"""launch/train.py's model and data, trained through Hugging Face Accelerate.

    accelerate launch --config_file launch/accelerate_cpu.yaml launch/train_accelerate.py   # 2 CPU processes
    accelerate launch --multi_gpu --num_processes 8 launch/train_accelerate.py --amp bf16  # 8 GPUs

The one rule: convert BatchNorm *before* ``accelerator.prepare``. ``prepare`` wraps the model in
DistributedDataParallel, and DDP must see the final layers (as with plain torchrun, convert
before wrapping). Everything else is ordinary Accelerate: ``prepare`` shards the data loader
over the processes, ``accelerator.backward`` replaces ``loss.backward``, and
``gather_for_metrics`` collects the validation predictions of every process.

Needs ``pip install accelerate`` (or the ``syncbn[accelerate]`` extra).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader
from train import Config, ResNet, build_datasets  # launch/train.py, next to this file

import syncbn


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="launch/train.py's ResNet through Accelerate, with syncbn")
    parser.add_argument("--data", choices=("synthetic", "digits"), default="synthetic", help="as in launch/train.py")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the training set")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per process per step")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate, cosine-decayed to 0")
    parser.add_argument("--train-size", type=int, default=4096, help="synthetic training images")
    parser.add_argument(
        "--bn", choices=("sync", "local"), default="sync", help="syncbn.SyncBatchNorm or plain BatchNorm2d"
    )
    parser.add_argument("--amp", choices=("none", "bf16"), default="none", help="Accelerate's bf16 mixed precision")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # cpu=True when there is no GPU: Accelerate then joins the processes with gloo.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if args.amp == "bf16" else "no")
    if int(os.environ.get("WORLD_SIZE", "1")) != accelerator.num_processes:
        raise SystemExit(
            f"launched as {os.environ['WORLD_SIZE']} processes, but Accelerate set up "
            f"{accelerator.num_processes}: check the accelerate config"
        )
    torch.manual_seed(args.seed)

    cfg = Config(data=args.data, train_size=args.train_size, seed=args.seed)
    train_set, val_set, in_channels, num_classes = build_datasets(cfg)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True)
    val_loader = DataLoader(val_set, batch_size=256)

    model = ResNet(in_channels, num_classes)
    if args.bn == "sync":
        model = syncbn.convert_sync_batchnorm(model)  # syncbn: before accelerator.prepare
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    total_steps = args.epochs * len(train_loader)
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)

    accelerator.print(
        f"{accelerator.num_processes} process(es) on {accelerator.device.type} ({accelerator.distributed_type.value}), "
        f"bn {args.bn}, mixed precision {accelerator.mixed_precision}, {len(train_loader)} steps per epoch"
    )
    step = 0
    for epoch in range(args.epochs):
        model.train()
        for x, y in train_loader:
            loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            step += 1
            if step >= total_steps:
                break
        # Validation with the bare model: in eval mode BatchNorm needs no communication.
        bare = accelerator.unwrap_model(model).eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in val_loader:
                with accelerator.autocast():
                    pred = bare(x).argmax(1)
                pred, y = accelerator.gather_for_metrics((pred, y))
                correct += (pred == y).sum().item()
                total += len(y)
        accelerator.print(
            f"epoch {epoch + 1}: step {step}, train loss {loss.item():.3f}, "
            f"val acc {100 * correct / total:.1f}% ({correct}/{total})"
        )
        if step >= total_steps:
            break
    # Release the DDP-wrapped model (ours and Accelerate's references) before end_training
    # destroys the process group: see the end of launch/train.py.
    del model, optimizer
    accelerator.free_memory()
    accelerator.end_training()


if __name__ == "__main__":
    main()
