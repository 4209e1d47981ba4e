"""The commands: one module each, ``run(cfg) -> result``; commands never import each other."""
