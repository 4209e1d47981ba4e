"""What the denoising network predicts: eps (Ho et al. 2020), x_0, or v (Salimans & Ho 2022).

Each objective is a small object in :data:`OBJECTIVES`: ``target`` is what the network regresses,
``to_eps`` turns the network's output into eps-hat for the samplers, and ``min_snr_weight`` is its
Min-SNR-gamma loss weight (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting").
The weights equal min(SNR, gamma) times the objective's implicit weighting, expressed in its units.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from genexp.diffusion.noise_schedule import NoiseSchedule
from genexp.errors import check_choice, check_float


class Objective:
    """The interface: a name and three small methods (a base so every objective has all of them)."""

    name: str

    def target(
        self, schedule: NoiseSchedule, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """What the network regresses at x_t = q_sample(x0, t, eps)."""
        raise NotImplementedError

    def to_eps(
        self, schedule: NoiseSchedule, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """eps-hat from the network output ``out`` at (x_t, t)."""
        raise NotImplementedError

    def min_snr_weight(self, snr: torch.Tensor, gamma: float) -> torch.Tensor:
        """Per-example loss weight min(SNR, gamma) in this objective's units (Hang et al. 2023, eq. 9)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EpsObjective(Objective):
    """Predict the noise eps: the "simple" loss of Ho et al. 2020 (eq. 14)."""

    name = "eps"

    def target(self, schedule, x0, eps, t):
        return eps

    def to_eps(self, schedule, out, x_t, t):
        return out

    def min_snr_weight(self, snr, gamma):
        # ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2, so min(SNR, gamma) on x0 is min(SNR, gamma) / SNR here
        return snr.clamp(max=gamma) / snr


class X0Objective(Objective):
    """Predict the clean sample x_0 directly (Ho et al. 2020, section 3.2, "predicting x_0")."""

    name = "x0"

    def target(self, schedule, x0, eps, t):
        return x0

    def to_eps(self, schedule, out, x_t, t):
        return schedule.predict_eps_from_x0(x_t, t, out)

    def min_snr_weight(self, snr, gamma):
        return snr.clamp(max=gamma)


class VObjective(Objective):
    """Predict the velocity v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022, section 4)."""

    name = "v"

    def target(self, schedule, x0, eps, t):
        return schedule.velocity(x0, eps, t)

    def to_eps(self, schedule, out, x_t, t):
        return schedule.predict_eps_from_v(x_t, t, out)

    def min_snr_weight(self, snr, gamma):
        # ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2
        return snr.clamp(max=gamma) / (snr + 1.0)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (EpsObjective(), X0Objective(), VObjective())}


def check_objective(name: str) -> str:
    """Return ``name`` if it is a key of :data:`OBJECTIVES`, else raise ConfigError("objective", ...)."""
    return check_choice("objective", name, tuple(OBJECTIVES))


def _simple(objective: Objective, snr: torch.Tensor, gamma: float) -> torch.Tensor:
    return torch.ones_like(snr)


def _min_snr(objective: Objective, snr: torch.Tensor, gamma: float) -> torch.Tensor:
    return objective.min_snr_weight(snr, gamma)


_WEIGHTINGS: dict[str, Callable[[Objective, torch.Tensor, float], torch.Tensor]] = {
    "simple": _simple,
    "min_snr": _min_snr,
}
LOSS_WEIGHTINGS = tuple(_WEIGHTINGS)


def loss_weight(weighting: str, objective: str, snr: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Per-example weight (B,) of the regression loss: ones for ``simple`` (Ho et al. 2020, eq. 14),
    Min-SNR-gamma for ``min_snr`` (Hang et al. 2023; gamma = 5 is their default).

    Args:
        weighting: one of :data:`LOSS_WEIGHTINGS`.
        objective: a key of :data:`OBJECTIVES`.
        snr: SNR(t) per example, (B,), e.g. ``schedule.snr_at(t)``; the weight has its dtype.
        gamma: the clip of Min-SNR (ignored by ``simple``).
    """
    check_choice("weighting", weighting, LOSS_WEIGHTINGS)
    check_objective(objective)
    gamma = check_float("gamma", gamma, positive=True)
    return _WEIGHTINGS[weighting](OBJECTIVES[objective], snr, gamma)
