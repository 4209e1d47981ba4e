"""A small CNN classifier whose penultimate layer is the offline feature space of FID/KID.

Inception-v3 features need a weights file that cannot be downloaded everywhere, and ImageNet features
say little about 28x28 digits anyway; a classifier trained once on the dataset's own labels gives
features that separate what matters for that dataset (the usual stand-in for Inception on MNIST).
Its numbers compare runs on the same dataset with each other, not with published Inception FIDs.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class SmallCNN(nn.Module):
    """conv-BN-ReLU blocks with two 2x poolings, global average pool, an MLP head.

    Global pooling makes it size-agnostic, so one class serves 28x28 digits and 64x64 faces.

    Args:
        in_channels: image channels (1 or 3).
        num_classes: logits produced by ``forward``.
        width: channels of the first block (doubled twice, so the pooled body has 4 * width).
        feature_dim: size of the penultimate layer (the FID/KID feature space).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, feature_dim: int = 128):
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.width, self.feature_dim = width, feature_dim
        w = width
        # one block at full resolution, then two per halving: most of the compute sits at 1/4 and
        # 1/16 of the pixels, so 5 epochs of mnist5k take seconds on a CPU
        self.body = nn.Sequential(
            _block(in_channels, w),
            nn.MaxPool2d(2),
            _block(w, 2 * w),
            _block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            _block(2 * w, 4 * w),
            _block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )  # (B, 4w)
        self.penultimate = nn.Sequential(nn.Linear(4 * w, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def arguments(self) -> dict[str, int]:
        """The constructor arguments, stored beside the weights so the cache rebuilds the network."""
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "width": self.width,
            "feature_dim": self.feature_dim,
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1], (B, C, H, W) -> penultimate activations (B, feature_dim)."""
        return self.penultimate(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.features(x))


@torch.no_grad()
def accuracy(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of uint8 images (N, C, H, W) whose argmax logit equals the label."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        pred = model(x.to(device).float().div_(255.0)).argmax(1)
        correct += int((pred.cpu() == y).sum())
    model.train(was_training)
    return correct / max(1, len(images))


def train_classifier(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    lr: float = 3e-3,
) -> tuple[SmallCNN, float]:
    """Train a :class:`SmallCNN` with Adam and a cosine learning-rate decay; return it and its test accuracy.

    Deterministic for a seed on a CPU with a fixed thread count: the initial weights and the
    shuffling come from ``seed`` only (the global RNG is left as it was).

    Args:
        train_images, test_images: uint8 (N, C, H, W).
        train_labels, test_labels: int64 (N,) class indices >= 0.
        epochs: passes over the training images.
        seed: seed of the initialisation and of the batch order.
        device: where to train; the returned model stays there, in eval mode.
    """
    # a caller may sit in a Lightning validation hook, under inference mode or no_grad
    with torch.inference_mode(False), torch.enable_grad():
        return _train(
            train_images, train_labels, test_images, test_labels, epochs, seed, device, batch_size, lr
        )


def _train(train_images, train_labels, test_images, test_labels, epochs, seed, device, batch_size, lr):
    num_classes = int(train_labels.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(train_images.shape[1], num_classes)
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(train_images) // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))
    for epoch in range(epochs):
        start, total, seen = time.perf_counter(), 0.0, 0
        for idx in torch.randperm(len(train_images), generator=generator).split(batch_size):
            x = train_images[idx].to(device).float().div_(255.0)  # (B, C, H, W) in [0, 1]
            y = train_labels[idx].to(device)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        log.info(
            "classifier epoch %d/%d: train loss %.4f (%.1f s)",
            epoch + 1,
            epochs,
            total / max(1, seen),
            time.perf_counter() - start,
        )
    recalibrate_batch_norm(model, train_images, batch_size)
    model.eval()
    return model, accuracy(model, test_images, test_labels)


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> None:
    """Set every BatchNorm's running statistics to their average over ``images`` (uint8).

    After a short training run the exponential running averages still remember the first steps'
    weights, and eval-mode predictions suffer; one forward pass with ``momentum=None`` (a
    cumulative average) replaces them by the statistics of the final weights.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    device = next(model.parameters()).device
    model.train()
    for x in images.split(batch_size):
        model(x.to(device).float().div_(255.0))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
