"""ODE solvers for dx/dt = v(x, t) from t0 to t1: fixed-step Euler, midpoint, Heun and RK4, and
adaptive Dormand-Prince (torchdiffeq). Each returns the final state and the NFE it spent.

A field is ``v(x, t) -> dx/dt`` with ``x`` of shape (B, ...) and ``t`` a (B,) tensor in x's dtype
(every row at the same time). Solvers own no network: a flow matching model passes its velocity,
the ODE likelihood an augmented field. Integration may run backwards (t1 < t0). The NFE is counted
by wrapping the field, so it is what was spent, not what the step count promises.

Global orders (error of the final state ~ h^p): Euler 1, midpoint 2, Heun 2, RK4 4
(Hairer, Nørsett & Wanner, *Solving ODEs I*, II.1, table 1.1-1.2 and eq. 1.8-1.9).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from genexp.errors import check_float, check_int
from genexp.progress import track

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ODEResult(NamedTuple):
    x: torch.Tensor  # the state at t1, (B, ...)
    nfe: int  # evaluations of the field spent


class _Counted:
    """The field, counting its calls and broadcasting a scalar time to (B,)."""

    def __init__(self, field: Field):
        self.field, self.calls = field, 0

    def __call__(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        self.calls += 1
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return self.field(x, t)


class FixedStepSolver:
    """``steps`` equal steps of h = (t1 − t0) / steps; subclasses give one step's update and its
    ``nfe_per_step`` (the field evaluations one step costs)."""

    nfe_per_step = 1

    @classmethod
    def steps_for_nfe(cls, nfe: int, **node) -> int:
        """The most steps whose NFE (``steps * nfe_per_step``) is at most ``nfe`` (0: none); ``node``:
        the solver's other arguments (none change a fixed-step solver's cost)."""
        return int(nfe) // cls.nfe_per_step

    def __init__(self, steps: int = 50):
        self.steps = check_int("steps", steps, minimum=1)

    def step(self, v: _Counted, x: torch.Tensor, t: float, h: float) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, field: Field, x: torch.Tensor, t0: float = 0.0, t1: float = 1.0) -> ODEResult:
        v, h = _Counted(field), (t1 - t0) / self.steps
        for i in track(range(self.steps), f"{type(self).__name__} steps"):
            x = self.step(v, x, t0 + i * h, h)
        return ODEResult(x, v.calls)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps})"


class EulerSolver(FixedStepSolver):
    """x ← x + h v(x, t): first order, 1 NFE per step."""

    def step(self, v, x, t, h):
        return x + h * v(x, t)


class MidpointSolver(FixedStepSolver):
    """Explicit midpoint, x ← x + h v(x + h/2 v(x, t), t + h/2): second order, 2 NFE per step."""

    nfe_per_step = 2

    def step(self, v, x, t, h):
        return x + h * v(x + (h / 2) * v(x, t), t + h / 2)


class HeunSolver(FixedStepSolver):
    """Heun's (explicit trapezoidal) method: Euler predictor x̃ = x + h k1, corrector
    x ← x + h/2 (k1 + v(x̃, t + h)): second order, 2 NFE per step (Karras et al. 2022, Alg. 1
    without its final Euler step: the velocity is defined at t = 1)."""

    nfe_per_step = 2

    def step(self, v, x, t, h):
        k1 = v(x, t)
        return x + (h / 2) * (k1 + v(x + h * k1, t + h))


class RK4Solver(FixedStepSolver):
    """The classical Runge-Kutta method (Kutta 1901): fourth order, 4 NFE per step."""

    nfe_per_step = 4

    def step(self, v, x, t, h):
        k1 = v(x, t)
        k2 = v(x + (h / 2) * k1, t + h / 2)
        k3 = v(x + (h / 2) * k2, t + h / 2)
        k4 = v(x + h * k3, t + h)
        return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


class Dopri5Solver:
    """Adaptive Dormand-Prince 5(4) (Dormand & Prince 1980) through ``torchdiffeq.odeint``: the step
    size keeps the local error estimate under atol + rtol |x|, so the NFE depends on the field."""

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5):
        self.rtol = check_float("rtol", rtol, positive=True, maximum=1.0)
        self.atol = check_float("atol", atol, positive=True, maximum=1.0)

    def __call__(self, field: Field, x: torch.Tensor, t0: float = 0.0, t1: float = 1.0) -> ODEResult:
        from torchdiffeq import odeint

        v = _Counted(field)
        times = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
        path = odeint(lambda t, y: v(y, t), x, times, method="dopri5", rtol=self.rtol, atol=self.atol)
        return ODEResult(path[-1], v.calls)

    def __repr__(self) -> str:
        return f"Dopri5Solver(rtol={self.rtol:g}, atol={self.atol:g})"
