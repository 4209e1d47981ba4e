"""Couplings of noise and data in a batch for flow matching: which x0 each x1 is paired with.

- :func:`independent`: the pair as drawn, q(x0) q(x1) (Lipman et al. 2023).
- :func:`minibatch_ot`: the exact optimal-transport plan between the batch's noise and its data
  under the squared Euclidean cost (Tong et al. 2023, OT-CFM, section 3.2; Pooladian et al. 2023).
  With equal batch sizes and uniform weights the optimal plan is a permutation (Birkhoff), found by
  the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``). Straighter pairings give
  straighter marginal paths, so fewer solver steps are needed at sampling time.
"""

from __future__ import annotations

import torch


def independent(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The noise as drawn: (B, ...) unchanged."""
    return x0


def transport_cost(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """(B, B) squared distances ||x0_i − x1_j||², computed in float64 for the assignment."""
    a, b = x0.flatten(1).double(), x1.flatten(1).double()
    return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)


def minibatch_ot(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """x0 reordered so that (x0[i], x1[i]) is the batch's optimal pairing: (B, ...).

    Minimises Σ_i ||x0_π(i) − x1_i||² over permutations π (exact, O(B³)); the marginals of x0 and
    x1 are unchanged, so the flow matching objective still transports q(x0) to q(x1).
    """
    from scipy.optimize import linear_sum_assignment

    cost = transport_cost(x0.detach(), x1.detach()).cpu().numpy()
    rows, cols = linear_sum_assignment(cost.T)  # rows: data index i, cols: the noise index π(i)
    order = torch.as_tensor(cols[rows.argsort()], device=x0.device)
    return x0[order]


COUPLINGS = {"independent": independent, "minibatch_ot": minibatch_ot}  # model.coupling
