"""``hydra_plugins.genexp_search.optuna_sweeper.OptunaSweeper``: the search recipes' sweeper
(``configs/hparams_search/``). Hydra constructs sweepers only from the ``hydra_plugins`` package,
so the class lives here; the work is :class:`genexp.search.StudySweeper`, imported when a search
starts (Hydra imports this module on every start: it stays light).
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper


class OptunaSweeper(Sweeper):
    """hydra-optuna-sweeper's configuration (``override /hydra/sweeper: optuna``), run by genexp's
    resumable study loop (:class:`genexp.search.StudySweeper`)."""

    def __init__(self, **kwargs: Any) -> None:
        from genexp.search import StudySweeper

        self.sweeper = StudySweeper(**kwargs)

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.sweeper.sweep(arguments)
