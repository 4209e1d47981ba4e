"""Started by every Python process that has tests/faults on ``PYTHONPATH`` (``faults.environ``):
with a ``GENEXP_FAULT_*`` variable set, genexp's modules are patched as they are imported.
(No other ``sitecustomize`` is shadowed in this environment: the interpreter ships none.)"""

import genexp_faults

genexp_faults.install_from_environ()
