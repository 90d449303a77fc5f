"""AdaHessian vs Adam on a small CNN, synthetic image task.

What it shows: hhfft.optim.AdaHessian trains a CNN with the official usage (``loss.backward(create_graph=True);
opt.step()``), the update running as one compiled fused step. Both optimizers get a small learning-rate sweep
("tuned a little"), the best of each is kept, and the loss curves are saved as a PNG.

The task: 16x16 grey images holding one bar (horizontal, vertical, or one of the two diagonals) at a random place,
with noise; the label is the bar's orientation. A fixed training set of 1024 images, a held-out set of 512.

    python examples/adahessian_cnn.py                    # sweep: several minutes on 2 CPU cores; out/adahessian_cnn.png
    python examples/adahessian_cnn.py --quick --out /tmp  # what the tests run
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from hhfft.optim import AdaHessian


def make_bars(n: int, generator: torch.Generator, size: int = 16, noise: float = 0.6):
    """Images [n, 1, size, size] with one bar of length 7 in one of four orientations; labels [n] in 0..3."""
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = noise * torch.randn(n, 1, size, size, generator=generator)
    steps = {0: (0, 1), 1: (1, 0), 2: (1, 1), 3: (1, -1)}
    starts = torch.randint(3, size - 10, (n, 2), generator=generator)
    for i in range(n):
        dy, dx = steps[int(labels[i])]
        y0, x0 = int(starts[i, 0]), int(starts[i, 1]) + (6 if dx < 0 else 0)
        for t in range(7):
            images[i, 0, y0 + dy * t, x0 + dx * t] += 1.5
    return images, labels


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        h = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return self.fc(h.mean(dim=(2, 3)))


def train(opt_name: str, lr: float, data, steps: int, batch: int, fused: bool):
    (x, y), (xv, yv) = data
    torch.manual_seed(0)
    model = CNN()
    if opt_name == "adahessian":
        opt = AdaHessian(model.parameters(), lr=lr, generator=torch.Generator().manual_seed(0), fused=fused)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward(create_graph=opt_name == "adahessian")
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        acc = (model(xv).argmax(1) == yv).float().mean().item()
    return {"losses": losses, "val_acc": acc, "seconds": seconds}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="one learning rate each, 25 steps, eager step")
    args = ap.parse_args(argv)
    sweeps = {"adam": [3e-3, 1e-2, 3e-2], "adahessian": [0.05, 0.15, 0.4]}
    fused = True
    if args.quick:
        sweeps = {"adam": [1e-2], "adahessian": [0.15]}
        args.steps, args.batch, fused = 25, 32, False
    g = torch.Generator().manual_seed(0)
    n_train, n_val = (256, 128) if args.quick else (1024, 512)
    data = (make_bars(n_train, g), make_bars(n_val, g))

    best = {}
    print(f"{'optimizer':<11} {'lr':>6} {'final loss':>10} {'val acc':>8} {'s':>6}")
    for name, lrs in sweeps.items():
        for lr in lrs:
            r = train(name, lr, data, args.steps, args.batch, fused)
            tail = sum(r["losses"][-20:]) / len(r["losses"][-20:])
            print(f"{name:<11} {lr:>6g} {tail:>10.4f} {r['val_acc']:>8.3f} {r['seconds']:>6.1f}")
            if name not in best or tail < best[name]["tail"]:
                best[name] = dict(r, lr=lr, tail=tail)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in best.items():
        ax.plot(r["losses"], label=f"{name} (lr={r['lr']:g}, val acc {r['val_acc']:.2f})", alpha=0.85)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_yscale("log")
    ax.set_title("CNN on synthetic bars: best of a small lr sweep each")
    ax.legend()
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "adahessian_cnn.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"saved {path}")
    return {"png": path, "best": best}


if __name__ == "__main__":
    main()
