"""Every private Hydra and OmegaConf API genexp relies on, in one place (hydra-core 1.3, omegaconf 2.3).

Neither library offers a public way to do these; each function names the internal it uses, so an
upgrade that moves one breaks here, visibly, and nowhere else. Lightning's are in
:mod:`genexp.lit.compat`. No torch import: the console entry point loads this on every call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig


def child(node: DictConfig, key: str) -> Any:
    """The node under ``key`` without resolving it (``DictConfig._get_node``), or None."""
    return node._get_node(key)


def is_null(node: Any) -> bool:
    """A node that is missing or holds null (``Node._is_none``)."""
    return node is None or node._is_none()


def is_interpolation(node: Any) -> bool:
    """A node whose value is an unresolved ``${...}`` (``Node._is_interpolation``)."""
    return node is not None and node._is_interpolation()


def raw_value(cfg: DictConfig, key: str) -> Any:
    """The value of the dotted ``key`` as written (an interpolation stays a string; ``Node._value``)."""
    node: Any = cfg
    for part in str(key).split("."):
        node = node._get_node(part)
    return node._value()


def wrap_error_report(wrap: Callable[[Callable], Callable]) -> None:
    """Put ``wrap`` around Hydra's error report, ``hydra._internal.utils.run_and_report`` (also
    bound in ``hydra._internal.hydra``): Hydra 1.3 has no hook for how a failed app is reported.
    Idempotent: a second call leaves the first wrapper."""
    from hydra._internal import hydra as hydra_main
    from hydra._internal import utils

    original = utils.run_and_report
    if getattr(original, "genexp_wrapped", False):
        return
    wrapped = wrap(original)
    wrapped.genexp_wrapped = True
    utils.run_and_report = wrapped
    hydra_main.run_and_report = wrapped
