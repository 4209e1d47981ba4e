"""Bits/dim through a probability-flow ODE: what flow matching and the score models share.

A family whose likelihood is the exact likelihood of an ODE flow (the instantaneous change of
variables, Chen et al. 2018; Hutchinson's trace, FFJORD) inherits :class:`ODEBitsPerDim` and gives
two things: ``bpd_field(x, u)``, dx/du from the noise end (u = 0) to the data end (u = 1) in
[-1, 1] image coordinates, and ``bpd_prior(x0)``, the log-density (nats per item) at the noise end.
The settings (``bpd_steps``, ``bpd_probes``, ``bpd_images``, ``bpd_stages``, ``bpd_solver``,
``bpd_tol``) are checked once here,
and the glue reads ``bpd_images``/``bpd_stages`` as for every family.
"""

from __future__ import annotations

import math
import warnings

import torch

from genexp.diffusion.ode_likelihood import SOLVERS, bits_per_dim, dequantize, ode_log_likelihood
from genexp.errors import check_choice, check_float, check_int

BPD_STAGES = ("val", "test")


class ODEBitsPerDim:
    """``nll_bpd``, ``nll_bpd_with_error`` and ``ode_bpd`` of an ODE flow (mix into an nn.Module)."""

    bpd_steps: int
    bpd_probes: int
    bpd_images: int | None
    bpd_stages: tuple[str, ...]
    bpd_solver: str
    bpd_tol: float

    def set_bpd(
        self, steps: int, probes: int, images: int | None, stages, solver: str = "rk4", tol: float = 1e-5
    ) -> None:
        """Args (the model's ``bpd_*`` keys): steps of the likelihood ODE's fixed-step solver (RK4:
        4 network and backward passes each, on ``probes`` copies of the batch); Hutchinson's
        Rademacher probes per image (2 or more give a standard error); at most ``images`` images per
        val/test epoch (None: all); the stages that compute it; the solver (``rk4``, ``midpoint``,
        ``euler`` on ``steps`` steps, or ``dopri5``: adaptive Dormand-Prince, steps ignored, for a
        field too stiff for a fixed grid); dopri5's rtol = atol (1e-5 as Song et al. 2021)."""
        self.bpd_steps = check_int("bpd_steps", steps, minimum=1)
        self.bpd_probes = check_int("bpd_probes", probes, minimum=1)
        self.bpd_images = None if images is None else check_int("bpd_images", images, minimum=1)
        self.bpd_stages = tuple(check_choice("bpd_stages", s, BPD_STAGES) for s in stages)
        self.bpd_solver = check_choice("bpd_solver", solver, SOLVERS)
        self.bpd_tol = check_float("bpd_tol", tol, positive=True, maximum=0.1)

    def bpd_cost(self) -> str:
        """What one image's bits/dim costs, for the log line before the test epoch."""
        if self.bpd_solver == "dopri5":
            return f"the likelihood ODE (adaptive dopri5, tol {self.bpd_tol:g}) x {self.bpd_probes} probes: a network+backward pass per function evaluation"
        per_step = {"euler": 1, "midpoint": 2, "rk4": 4}[self.bpd_solver]
        passes = per_step * self.bpd_steps * self.bpd_probes
        return f"the likelihood ODE ({self.bpd_solver}, {self.bpd_steps} steps x {self.bpd_probes} probes): {passes} network+backward passes per image"

    def bpd_field(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bpd_prior(self, x0: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def nll_bpd(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Bits/dim of the 8-bit images x in [0, 1] through the ODE, per image: (B,) (an estimate by
        Hutchinson's trace; in expectation an upper bound on the discrete data's)."""
        return self.ode_bpd(x, generator)[0]

    def nll_bpd_with_error(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(bits/dim, Hutchinson's standard error), both (B,): :meth:`ode_bpd`."""
        return self.ode_bpd(x, generator)

    def ode_bpd(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(bits/dim, Hutchinson's standard error of it), both (B,): the change of variables from the
        uniformly dequantised images on [-1, 1) back to the prior, by ``bpd_solver``
        (:func:`genexp.diffusion.ode_likelihood.ode_log_likelihood`)."""
        # the divergence needs autograd: leave Lightning's inference mode for the val/test stages
        with torch.inference_mode(False), torch.no_grad():
            y = dequantize(x.clone(), generator=generator)  # (B, C, H, W) in [-1, 1)
            out = ode_log_likelihood(
                self.bpd_field,
                y,
                self.bpd_prior,
                steps=self.bpd_steps,
                probes=self.bpd_probes,
                generator=generator,
                solver=self.bpd_solver,
                rtol=self.bpd_tol,
                atol=self.bpd_tol,
            )
        num_dims = x[0].numel()
        bpd = bits_per_dim(out.log_prob, num_dims)
        if bool(bpd.mean() < 0):
            # E_u[-log2 p(x + u)] >= -log2 P(x) >= 0 for any density (Jensen): below 0 is the solver's error
            fix = (
                f"lower model.bpd_tol (now {self.bpd_tol:g})"
                if self.bpd_solver == "dopri5"
                else f"raise model.bpd_steps (now {self.bpd_steps}) or set model.bpd_solver=dopri5"
            )
            warnings.warn(
                f"bits/dim {bpd.mean().item():.3g} < 0 is impossible for 8-bit data: the likelihood ODE "
                f"is not converged; {fix}",
                RuntimeWarning,
                stacklevel=2,
            )
        # bits/dim is affine in log p: its standard error is log p's over D ln 2
        return bpd, out.std_err / (num_dims * math.log(2.0))
