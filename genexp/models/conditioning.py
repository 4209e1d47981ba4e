"""Class conditioning shared by every family: labels in, label dropout, classifier-free guidance.

A conditional family has ``num_classes = N > 0`` (0: unconditional, as before) and takes ``y``, a (B,)
long tensor of classes in [0, N), in ``loss(x, y)`` and ``sample(n, generator, y=...)``. The families
trained with label dropout (``cond_drop_prob = p > 0``: the diffusion and flow-matching families) learn
an extra "null" class, index N, which is what ``guidance`` mixes against (Ho & Salimans 2022):

    out_w = (1 + w) * out(x, t, y) - w * out(x, t, null)          # eps, v or the score; w = 0: conditional

Likelihood families give log p(x | y) for a label and, for ``y=None``, the marginal under a uniform
class prior, log p(x) = logsumexp_y log p(x | y) - log N, so bits/dim stay comparable with the
unconditional models (:func:`marginal_log_prob`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from genexp.errors import ConfigError, check_float, check_int


def check_num_classes(num_classes: int | None) -> int:
    """``model.num_classes``: null or 0 (unconditional) or N >= 2."""
    n = 0 if num_classes is None else check_int("num_classes", num_classes, minimum=0)
    if n == 1:
        raise ConfigError("num_classes", n, "one class is no condition; use 0 (unconditional) or N >= 2")
    return n


def check_drop_prob(p: float) -> float:
    """``model.cond_drop_prob``: the share of training labels replaced by the null class, in [0, 1]."""
    return check_float("cond_drop_prob", p, minimum=0.0, maximum=1.0)


def check_labels(y: torch.Tensor, num_classes: int, null: bool = False) -> torch.Tensor:
    """``y`` as (B,) long classes in [0, N) (``null``: the null class N allowed too); one line otherwise."""
    y = torch.as_tensor(y).long().flatten()
    top = num_classes + 1 if null else num_classes
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= top):
        raise ConfigError(
            "num_classes",
            num_classes,
            f"labels must be in [0, {num_classes}); got {int(y.min())}..{int(y.max())} "
            "(-1: the dataset has no labels; use model.num_classes=0)",
        )
    return y


def labels_for(
    n: int,
    num_classes: int,
    device: torch.device,
    y: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """The (n,) classes to sample: ``y`` (a class for all, or one per sample), else drawn uniformly
    with ``generator``; None for an unconditional model (which refuses a ``y``)."""
    if not num_classes:
        if y is not None:
            raise ConfigError("y", "given", "this model is unconditional; train it with model.num_classes=N")
        return None
    if y is None:
        gen_device = generator.device if generator is not None else device
        return torch.randint(num_classes, (n,), generator=generator, device=gen_device).to(device)
    y = torch.as_tensor(y, device=device).long().flatten()
    if y.numel() == 1:
        y = y.expand(n)
    if y.numel() != n:
        raise ConfigError("y", f"{y.numel()} labels", f"give one label or one per sample ({n})")
    return check_labels(y, num_classes)


def drop_labels(y: torch.Tensor, p: float, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Label dropout for classifier-free guidance: each label becomes the null class N with prob. p."""
    if p <= 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, num_classes), y)


def null_labels(like: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The null class N for every entry of the (B,) labels ``like``."""
    return torch.full_like(like, num_classes)


def guided(cond: torch.Tensor, uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance: (1 + w) * cond - w * uncond (w = 0 returns ``cond`` itself)."""
    if w == 0:
        return cond
    return (1.0 + w) * cond - w * uncond


def guided_call(
    fn: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, w: float, num_classes: int
) -> torch.Tensor:
    """``fn(x, t, y)`` under guidance w, the conditional and null passes batched into one call."""
    if y is None or w == 0:
        return fn(x, t, y)
    both = fn(torch.cat([x, x]), torch.cat([t, t]) if t.dim() else t, torch.cat([y, null_labels(y, num_classes)]))
    cond, uncond = both.chunk(2)
    return guided(cond, uncond, w)


def check_guidance(guidance: float | None, cond_drop_prob: float, num_classes: int) -> float:
    """``guidance=w`` needs a model trained with label dropout (it learned the null class)."""
    if guidance is None or guidance == 0:
        return 0.0
    w = check_float("guidance", guidance, minimum=0.0)
    if not num_classes:
        raise ConfigError("guidance", w, "needs a conditional model: train with model.num_classes=N")
    if cond_drop_prob <= 0:
        raise ConfigError(
            "guidance", w, "needs a model trained with label dropout: train with model.cond_drop_prob=0.1"
        )
    return w


def marginal_log_prob(log_prob: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log p(x) = logsumexp_y log p(x | y) - log N: (B,) nats, ``log_prob(y)`` giving (B,) per class."""
    per_class = [log_prob(torch.full((x.shape[0],), c, dtype=torch.long, device=x.device)) for c in range(num_classes)]
    return torch.logsumexp(torch.stack(per_class, 1), dim=1) - math.log(num_classes)


class LabelEmbedding(nn.Module):
    """A learned vector per class, plus one for the null class (index N) when ``null`` is true."""

    def __init__(self, num_classes: int, dim: int, null: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + int(null), dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """(B,) long -> (B, dim)."""
        return self.embedding(y)
