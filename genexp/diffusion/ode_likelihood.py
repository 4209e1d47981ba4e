"""Exact log-likelihood of a continuous-time flow: the probability-flow ODE and the change of variables.

Convention (shared by the flow-matching family and DDPM's probability-flow field): time runs from
noise at t = 0 to data at t = 1, and ``velocity(x, t)`` with t a (B,) float tensor gives dx/dt.
Along a solution x_t of the ODE the log-density obeys the instantaneous change of variables

    d/dt log p_t(x_t) = -div v(x_t, t)                  (Chen et al. 2018, theorem 1)

so, integrating from the data x_1 back to the noise x_0,

    log p_1(x_1) = log p_0(x_0) - integral_0^1 div v(x_t, t) dt.

The state integrated backward from t = 1 to t = 0 is (x_t, L_t) with dL/dt = div v and L_1 = 0, so
L_0 = -integral_0^1 div v dt and log p_1(x_1) = log p_0(x_0) + L_0.

The divergence is either exact (the trace of the Jacobian from D vector-Jacobian products, one per
unit vector: tiny shapes only) or Hutchinson's estimator eps^T (dv/dx) eps, E[eps eps^T] = I, with
Rademacher eps held fixed along one solve (FFJORD, Grathwohl et al. 2019, section 3.1): the whole
integral is then an unbiased estimate of the exact one. Several probes are stacked along the batch
(one solve of P copies: one network pass of P*B items per function evaluation) and their spread
gives the standard error. The velocity must treat batch items independently (no batch statistics),
as every genexp net does in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from genexp.errors import check_choice, check_float, check_int
from genexp.progress import track

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DIVERGENCES = ("hutchinson", "exact")
SOLVERS = ("euler", "midpoint", "rk4", "dopri5")
LEVELS = 256  # 8-bit data


class ODELogLikelihood(NamedTuple):
    """``log_prob`` (B,) nats per item; ``std_err`` (B,) the Hutchinson estimate's standard error
    over probes (0 for the exact trace, NaN for a single probe: one draw has no spread); ``nfe`` the
    velocity evaluations spent (each is one batched forward and one backward pass)."""

    log_prob: torch.Tensor
    std_err: torch.Tensor
    nfe: int


def standard_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    """log N(x; 0, I) in nats per item: (B, ...) -> (B,), the prior at the noise end."""
    return -0.5 * (x.pow(2) + math.log(2 * math.pi)).flatten(1).sum(1)


def _probe_vectors(x: torch.Tensor, divergence: str, probes: int, generator) -> torch.Tensor:
    """(K, B, ...) probes: the D unit vectors (exact trace) or ``probes`` Rademacher draws."""
    b, shape = x.shape[0], x.shape[1:]
    if divergence == "exact":
        d = shape.numel()
        eye = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, 1, *shape)
        return eye.expand(d, b, *shape)
    gen_device = generator.device if generator is not None else x.device
    bits = torch.randint(0, 2, (probes, *x.shape), generator=generator, device=gen_device)
    return (bits.to(device=x.device, dtype=x.dtype) * 2 - 1).contiguous()


def _augmented(velocity: Velocity, eps: torch.Tensor, counter: list[int]):
    """The field of the state (x, L): (dx/dt, dL/dt) = (v, eps^T dv/dx eps), on (K*B, ...) copies."""

    def field(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        counter[0] += 1
        x = state[0]
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            v = velocity(x, t.to(x.dtype).expand(x.shape[0]))
            (vjp,) = torch.autograd.grad(v, x, eps)  # eps^T dv/dx
        return v.detach(), (vjp * eps).flatten(1).sum(1)

    return field


def _fixed_step(field, state, steps: int, solver: str, like: torch.Tensor):
    """Euler, explicit midpoint or classic RK4 on a uniform grid from t = 1 to t = 0 (h = -1/steps)."""
    h = -1.0 / steps

    def add(s, k, c):
        return tuple(a + c * b for a, b in zip(s, k))

    for i in track(range(steps), f"likelihood ODE ({solver}) steps"):
        t = like.new_tensor(1.0 + i * h)
        k1 = field(t, state)
        if solver == "euler":
            state = add(state, k1, h)
        elif solver == "midpoint":
            state = add(state, field(t + h / 2, add(state, k1, h / 2)), h)
        else:  # rk4
            k2 = field(t + h / 2, add(state, k1, h / 2))
            k3 = field(t + h / 2, add(state, k2, h / 2))
            k4 = field(t + h, add(state, k3, h))
            incr = tuple((a + 2 * b + 2 * c + d) / 6 for a, b, c, d in zip(k1, k2, k3, k4))
            state = add(state, incr, h)
    return state


def _adaptive(field, state, rtol: float, atol: float, like: torch.Tensor):
    """Dormand-Prince 5(4) with error control (torchdiffeq's ``dopri5``), t = 1 -> 0."""
    from torchdiffeq import odeint

    grid = like.new_tensor([1.0, 0.0])
    out = odeint(field, state, grid, rtol=rtol, atol=atol, method="dopri5")
    return tuple(o[-1] for o in out)


def ode_log_likelihood(
    velocity: Velocity,
    x1: torch.Tensor,
    prior_log_prob: Callable[[torch.Tensor], torch.Tensor] = standard_normal_log_prob,
    steps: int = 32,
    divergence: str = "hutchinson",
    probes: int = 1,
    generator: torch.Generator | None = None,
    solver: str = "rk4",
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> ODELogLikelihood:
    """log p_1(x1) under the flow ``velocity`` from the prior p_0 (see the module docstring).

    Args:
        velocity: ``(x, t) -> dx/dt``, x (N, ...) and t (N,); noise at t = 0, data at t = 1.
        x1: the data, (B, ...).
        prior_log_prob: ``x0 -> log p_0(x0)`` (B,) in nats (default: the standard normal).
        steps: steps of a fixed-step solver (ignored by ``dopri5``).
        divergence: ``hutchinson`` (Rademacher probes) or ``exact`` (D backward passes' worth of
            copies: tiny shapes only).
        probes: Hutchinson probes, stacked as copies of the batch; their mean is the estimate.
        generator: draws the probes.
        solver: ``euler``, ``midpoint``, ``rk4`` (fixed steps) or ``dopri5`` (adaptive: rtol, atol).
    """
    # the divergence needs autograd, also under Lightning's val/test inference mode: leave it, and
    # copy x1 out of it (an inference tensor cannot be recorded for backward)
    with torch.inference_mode(False):
        return _solve(
            velocity, x1.clone(), prior_log_prob, steps, divergence, probes, generator, solver, rtol, atol
        )


def _solve(velocity, x1, prior_log_prob, steps, divergence, probes, generator, solver, rtol, atol):
    """:func:`ode_log_likelihood` outside inference mode."""
    divergence = check_choice("divergence", divergence, DIVERGENCES)
    solver = check_choice("solver", solver, SOLVERS)
    steps = check_int("steps", steps, minimum=1)
    probes = check_int("probes", probes, minimum=1)
    eps = _probe_vectors(x1, divergence, probes, generator)  # (K, B, ...)
    k, b = eps.shape[0], x1.shape[0]
    eps = eps.reshape(k * b, *x1.shape[1:])
    state = (x1.detach().repeat(k, *([1] * (x1.dim() - 1))), x1.new_zeros(k * b))
    counter = [0]
    field = _augmented(velocity, eps, counter)
    if solver == "dopri5":
        rtol = check_float("rtol", rtol, positive=True)
        atol = check_float("atol", atol, positive=True)
        x0, delta = _adaptive(field, state, rtol, atol, x1)
    else:
        x0, delta = _fixed_step(field, state, steps, solver, x1)
    prior = prior_log_prob(x0[:b])  # the x-trajectories of the K copies are the same
    delta = delta.reshape(k, b)  # L_0 = -integral div v dt, per probe
    if divergence == "exact":
        return ODELogLikelihood(prior + delta.sum(0), torch.zeros_like(prior), counter[0])
    std_err = delta.std(0) / math.sqrt(k) if k > 1 else torch.full_like(prior, float("nan"))
    return ODELogLikelihood(prior + delta.mean(0), std_err, counter[0])


def dequantize(
    x: torch.Tensor,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    data_range: float = 2.0,
) -> torch.Tensor:
    """8-bit images x = k / 255 in [0, 1] -> y = data_range (k + u) / 256 - data_range / 2, u ~ U[0, 1).

    The uniform dequantisation of :mod:`genexp.flows.dequantized` (v = k + u), then mapped onto
    [-1, 1) for ``data_range`` 2 (where the diffusion families' data live). Pair it with
    :func:`bits_per_dim`.
    """
    if noise is None:
        gen_device = generator.device if generator is not None else x.device
        noise = torch.rand(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
    return data_range * (torch.round(x * (LEVELS - 1)) + noise) / LEVELS - data_range / 2


def bits_per_dim(log_prob_continuous: torch.Tensor, num_dims: int, data_range: float = 2.0) -> torch.Tensor:
    """Bits/dim on the 8-bit footing of the flows, from log p(y) of y = :func:`dequantize` (x).

    The flows (:mod:`genexp.flows.dequantized`) report -log p(v) / (D ln 2) for the dequantised
    levels v = k + u in [0, 256)^D, an upper bound on the discrete data's bits/dim (Theis et al.
    2016). Here the model's density is over y = data_range v / 256 - data_range / 2: a per-dimension
    affine map with dy/dv = data_range / 256, so by the change of variables

        log p(v) = log p(y) + D log(data_range / 256) = log p(y) + D log data_range - D log 256,
        bpd      = -(log p(y) + D log data_range - D log 256) / (D ln 2).

    E.g. the uniform density on [-1, 1)^D, log p(y) = -D log 2, gives 8 bits/dim (every level
    equally likely), as a flow's uniform density on [0, 256)^D does.

    Args:
        log_prob_continuous: log p(y) in nats per item, (B,).
        num_dims: D = C * H * W.
        data_range: the width of y's interval (2 for [-1, 1)).
    """
    log_p_v = log_prob_continuous + num_dims * (math.log(data_range) - math.log(LEVELS))
    return -log_p_v / (num_dims * math.log(2.0))
