"""genexp's Hydra sweeper plugin (``hydra.sweeper._target_``): see :mod:`genexp.search`."""
