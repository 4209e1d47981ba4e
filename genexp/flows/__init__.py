"""Normalizing-flow layers in pure torch (Dinh et al. 2017; Kingma & Dhariwal 2018).

Every layer maps ``x -> (y, log_det)`` with ``forward`` and ``y -> x`` with ``inverse``, where
``log_det`` is log |det dy/dx| per example, shape (B,). Layers compose with :class:`FlowSequence`;
:class:`MultiScaleFlow` adds the factor-out of half the dimensions after each scale.
"""

from genexp.flows.actnorm import ActNorm
from genexp.flows.base import FlowSequence
from genexp.flows.coupling import AffineCoupling, checkerboard
from genexp.flows.dequantized import DequantizedFlow, Logit
from genexp.flows.invconv import InvConv1x1
from genexp.flows.multiscale import MultiScaleFlow
from genexp.flows.squeeze import Squeeze

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "DequantizedFlow",
    "FlowSequence",
    "InvConv1x1",
    "Logit",
    "MultiScaleFlow",
    "Squeeze",
    "checkerboard",
]
