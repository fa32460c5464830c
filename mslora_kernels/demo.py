"""End-to-end demo: adapt a frozen, pre-trained CNN to a new task with MSLoRA.

    python -m mslora_kernels.demo [--out demo_out] [--seed 0] [--quick]

1. Pre-trains a small ResNet (torchvision's layout, :class:`mslora_kernels.models.ResNet`) on
   scikit-learn's handwritten digits 0-4 (shipped with scikit-learn: nothing is downloaded).
2. Adapts it to a new task, the digits 5-9 written in negative (ink and paper swapped), three
   ways: a linear probe (new head only), MSLoRA (``inject``: adapters + new head, backbone frozen,
   BatchNorm statistics included) and full fine-tuning (every weight).
3. Prints a table of trainable parameters, test accuracy, wall time and peak training memory, and
   writes PNG plots into ``--out``: the loss and accuracy curves, and where the adapters reweight
   the features on a few test images (|H(x)| summed over channels, over the input: the idea of
   the paper's Figure 1).

On a GPU the adapters run the fused backend (``backend="auto"``), on a CPU the reference.
Peak training memory is what training needs beyond the weights and the data: on CUDA,
``max_memory_allocated`` minus what was allocated before; on a CPU (where PyTorch keeps no
allocator statistics) the sum of gradients, optimizer state and the largest set of activations
autograd saved for backward in one step, counted with ``torch.autograd.graph.saved_tensors_hooks``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import MSLoRA, MSLoRAConfig, inject, trainable_parameters
from .backends import resolve_backend
from .inject import freeze
from .models import ResNet


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
@dataclass
class Task:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_tasks(seed: int, quick: bool) -> tuple[Task, Task]:
    """Task A: digits 0-4. Task B: digits 5-9 in negative. Stratified 70/30 splits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    y = digits.target
    tasks = []
    for name, classes, transform in (("digits 0-4", range(0, 5), lambda v: v),
                                     ("digits 5-9, negative", range(5, 10), lambda v: 1.0 - v)):
        keep = np.isin(y, list(classes))
        xs, ys = transform(x[keep]), y[keep] - min(classes)
        xtr, xte, ytr, yte = train_test_split(xs, ys, test_size=0.3, stratify=ys,
                                              random_state=seed)
        if quick:
            xtr, ytr, xte, yte = xtr[:128], ytr[:128], xte[:128], yte[:128]
        tasks.append(Task(name, *(torch.from_numpy(np.ascontiguousarray(a)) for a in (
            xtr[:, None], ytr, xte[:, None], yte))))
    for t in tasks:
        t.y_train, t.y_test = t.y_train.long(), t.y_test.long()
    return tasks[0], tasks[1]


# --------------------------------------------------------------------------------------------------
# Training, with time and memory
# --------------------------------------------------------------------------------------------------
class _SavedActivations:
    """Bytes of the distinct tensors autograd saves for backward (parameters excluded)."""

    def __init__(self, model: nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in self.params:
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def _state_bytes(model: nn.Module, optim: torch.optim.Optimizer) -> int:
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                if p.grad is not None)
    state = sum(v.numel() * v.element_size() for s in optim.state.values() for v in s.values()
                if torch.is_tensor(v))
    return grads + state


@dataclass
class Result:
    method: str
    trainable: int
    accuracy: float = 0.0
    seconds: float = 0.0
    peak_mb: float = 0.0
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was)
    return acc


def train(model: nn.Module, task: Task, method: str, epochs: int, lr: float, batch_size: int,
          device: torch.device, seed: int, progress: bool) -> Result:
    from tqdm.auto import tqdm

    model.to(device)
    x, y = task.x_train.to(device), task.y_train.to(device)
    xt, yt = task.x_test.to(device), task.y_test.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, epochs * -(-len(x) // batch_size))
    result = Result(method, trainable_parameters(model).trainable)
    g = torch.Generator().manual_seed(seed)
    cuda = device.type == "cuda"
    saved = _SavedActivations(model)
    peak = 0
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(epochs), desc=f"{method:>16}", disable=not progress, leave=True)
    for _ in bar:
        total, count = 0.0, 0
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            idx = idx.to(device)
            optim.zero_grad(set_to_none=True)
            saved.storages.clear()
            count_saved = (contextlib.nullcontext() if cuda else
                           torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t))
            with count_saved:
                loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optim.step()
            sched.step()
            if not cuda:
                peak = max(peak, saved.nbytes + _state_bytes(model, optim))
            total += loss.item() * len(idx)
            count += len(idx)
        result.losses.append(total / count)
        result.accuracies.append(evaluate(model, xt, yt))
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}", acc=f"{result.accuracies[-1]:.3f}")
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    result.seconds = time.perf_counter() - start
    result.peak_mb = peak / 2**20
    result.accuracy = result.accuracies[-1]
    return result


# --------------------------------------------------------------------------------------------------
# The three ways to adapt
# --------------------------------------------------------------------------------------------------
def new_head(model: ResNet, classes: int, seed: int) -> ResNet:
    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    model.fc = nn.Linear(model.fc.in_features, classes)
    return model


def adapt(method: str, pretrained: ResNet, classes: int, seed: int, rank: int) -> ResNet:
    model = new_head(pretrained, classes, seed)
    if method == "linear probe":
        freeze(model, trainable=["fc"])
    elif method == "MSLoRA":
        inject(model, MSLoRAConfig(rank=rank, groups=4, trainable=["fc"], backend="auto"))
    elif method != "full fine-tune":
        raise ValueError(f"unknown method {method!r}")
    return model


# --------------------------------------------------------------------------------------------------
# Output: table and plots
# --------------------------------------------------------------------------------------------------
def format_table(results: list[Result], total_params: int) -> str:
    head = (f"{'method':<16} {'trainable params':>17} {'% of model':>10} {'test acc':>9} "
            f"{'wall time':>10} {'peak train mem':>15}")
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(f"{r.method:<16} {r.trainable:>17,} {100 * r.trainable / total_params:>9.2f}% "
                    f"{100 * r.accuracy:>8.1f}% {r.seconds:>9.1f}s {r.peak_mb:>12.2f} MB")
    return "\n".join(rows)


def plot_curves(results: list[Result], pretrain: Result, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(range(1, len(pretrain.losses) + 1), pretrain.losses, "k--",
             label="pre-training (task A)")
    for r in results:
        ax1.plot(range(1, len(r.losses) + 1), r.losses, label=r.method)
        ax2.plot(range(1, len(r.accuracies) + 1), [100 * a for a in r.accuracies], label=r.method)
    ax1.set(xlabel="epoch", ylabel="training loss", yscale="log", title="Loss")
    ax2.set(xlabel="epoch", ylabel="test accuracy (%)", title="Task B: digits 5-9, negative")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def adapter_maps(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """|H(x)| summed over channels for every adapter: (N, h, w) maps, keyed by adapter name."""
    maps, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, MSLoRA):
            def hook(mod, args, out, name=name):
                maps[name] = (out - args[0]).abs().sum(1).float().cpu()
            hooks.append(m.register_forward_hook(hook))
    model.eval()
    model(x)
    for h in hooks:
        h.remove()
    return maps


def plot_reweighting(model: nn.Module, task: Task, device: torch.device, path: str,
                     n: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = task.x_test[:n]
    maps = adapter_maps(model, x.to(device))
    names = sorted(maps)
    fig, axes = plt.subplots(n, len(names) + 1, figsize=(1.9 * (len(names) + 1), 1.9 * n))
    for i in range(n):
        img = x[i, 0].numpy()
        axes[i, 0].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_title(f"input: digit {int(task.y_test[i]) + 5}", fontsize=8)
        for j, name in enumerate(names, start=1):
            m = maps[name][i][None, None]
            m = F.interpolate(m, size=img.shape, mode="bilinear", align_corners=False)[0, 0]
            axes[i, j].imshow(img, cmap="gray", vmin=0, vmax=1)
            axes[i, j].imshow(m.numpy(), cmap="inferno", alpha=0.6)
            if i == 0:
                axes[i, j].set_title(f"|H(x)| {name.replace('.mslora', '')}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("Where MSLoRA reweights the frozen features (|H(x)| summed over channels)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mslora_kernels.demo",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo_out", help="directory for the PNG plots")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, init and order")
    p.add_argument("--epochs", type=int, default=None, help="adaptation epochs (default 30)")
    p.add_argument("--pretrain-epochs", type=int, default=None,
                   help="pre-training epochs (default 20)")
    p.add_argument("--rank", type=int, default=16, help="MSLoRA rank D (default 16, G=4)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: the tensors are tiny, and one thread avoids "
                        "OpenMP spin-waiting on a shared machine)")
    p.add_argument("--quick", action="store_true", help="a tiny run (tests): 128 images, 2 epochs")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p.parse_args(argv)


def main(argv=None) -> list[Result]:
    threads = torch.get_num_threads()
    try:
        return run(parse_args(argv))
    finally:
        torch.set_num_threads(threads)


def _check_demo_dependencies() -> None:
    import importlib.util

    missing = [m for m in ("sklearn", "matplotlib", "tqdm") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(
            f"the demo needs {', '.join(missing)}: pip install 'mslora-kernels[demo]' "
            "(scikit-learn, matplotlib; tqdm comes with the package)"
        )


def run(args: argparse.Namespace) -> list[Result]:
    _check_demo_dependencies()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    epochs = args.epochs or (2 if args.quick else 30)
    pre_epochs = args.pretrain_epochs or (2 if args.quick else 20)
    progress = not args.no_progress
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task_a, task_b = load_tasks(args.seed, args.quick)
    backend = resolve_backend("auto", device)
    print(f"mslora_kernels demo: device {device}, MSLoRA backend {backend!r}, seed {args.seed}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"task A (pre-training): {task_a.name}, {len(task_a.x_train)} train / "
          f"{len(task_a.x_test)} test images; task B (adaptation): {task_b.name}, "
          f"{len(task_b.x_train)} / {len(task_b.x_test)}")

    backbone = ResNet(layers=(1, 1, 1), widths=(16, 32, 64), in_chans=1, num_classes=5)
    pre = train(backbone, task_a, "pre-training", pre_epochs, 3e-3, 64, device, args.seed, progress)
    print(f"pre-trained on task A: test accuracy {100 * pre.accuracy:.1f}% "
          f"({pre.seconds:.1f}s); the same backbone on task B before adapting: "
          f"{100 * evaluate(backbone, task_b.x_test.to(device), task_b.y_test.to(device)):.1f}% "
          "(chance 20%)")

    results, models = [], {}
    for method, lr in (("linear probe", 1e-2), ("MSLoRA", 1e-2), ("full fine-tune", 3e-3)):
        model = adapt(method, backbone, 5, args.seed, args.rank)
        results.append(train(model, task_b, method, epochs, lr, 64, device, args.seed, progress))
        models[method] = model
    total = trainable_parameters(models["full fine-tune"]).total
    print()
    print(f"Adapting to task B ({task_b.name}); {epochs} epochs each; model has {total:,} "
          f"parameters (MSLoRA adds {trainable_parameters(models['MSLoRA']).total - total:,})")
    print(format_table(results, total))
    os.makedirs(args.out, exist_ok=True)
    curves = os.path.join(args.out, "loss_curves.png")
    maps = os.path.join(args.out, "mslora_reweighting.png")
    plot_curves(results, pre, curves)
    plot_reweighting(models["MSLoRA"], task_b, device, maps)
    print(f"plots: {curves}, {maps}")
    return results


if __name__ == "__main__":
    main()
