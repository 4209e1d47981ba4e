"""Hydra's own errors as genexp's one line: an unknown group option, a misspelled key, bad override
syntax, a run dir that cannot be written.

Hydra reports these over several lines (with its config search path) and exits with status 1;
genexp reports every user error as one line on stderr with status 2. ``HYDRA_FULL_ERROR=1`` still
gives Hydra's full report. No torch import: the console entry point loads this on every call.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
from collections.abc import Callable

from genexp.atomic import is_full, write_refusal
from genexp.hydra_compat import wrap_error_report


def _lines(text: str) -> list[str]:
    """Non-empty lines of ``text`` up to Hydra's search-path listing."""
    out = []
    for line in str(text).splitlines():
        if line.startswith("Config search path"):
            break
        if line.strip():
            out.append(line.strip())
    return out


def _missing_option(err) -> str:
    """``model=gan_typo`` -> the group's options and the closest one."""
    first = re.sub(r"^In '[^']*': ", "", _lines(str(err))[0])  # "In 'train': Could not find ..."
    missing = str(getattr(err, "missing_cfg_file", "") or "")
    options = list(getattr(err, "options", None) or [])
    if not options or "/" not in missing:
        return first
    group, name = missing.rsplit("/", 1)
    close = difflib.get_close_matches(name, options, n=1)
    hint = f" (did you mean {group}={close[0]}?)" if close else ""
    return f"{first}; {group} options: {', '.join(options)}{hint}"


def _unknown_key(err, cause) -> str:
    """``optimizer.lrr=1`` -> the keys that node has and the closest one."""
    full_key, key = str(cause.full_key), str(getattr(cause, "key", "") or "")
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    node = getattr(cause, "parent_node", None)
    keys = [str(k) for k in (node.keys() if node is not None else []) if not str(k).startswith("_")]
    # hydra: Hydra's own node; model.family: the family's metadata, not a constructor argument
    keys = [k for k in keys if k != "hydra" and not (parent == "model" and k == "family")]
    close = difflib.get_close_matches(key, keys, n=1)
    prefix = f"{parent}." if parent else ""
    given = re.search(r"override '([^']+)'", _lines(str(err))[0])
    renamed = _renamed_hint(given.group(1) if given else full_key)
    hint = renamed or (f"; did you mean {prefix}{close[0]}?" if close else "")
    append = next((line.split(" use ", 1)[1] for line in _lines(str(err)) if " use +" in line), None)
    append = None if renamed else append
    shown = ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "")
    has = f"{parent or 'the config'} has: {shown}" if keys else ""
    extra = "; ".join(p for p in (has, f"{append} adds a new key" if append else "") if p)
    first = _lines(str(err))[0].rstrip(".")  # "Could not override 'model.net.depth'": the key as given
    return f"{first}: {_lines(str(cause))[0]}{hint}" + (f" ({extra})" if extra else "")


def _renamed_hint(full_key: str) -> str:
    """A key some family has renamed (its ``family.renamed``): the new name, as the fix."""
    from genexp import families

    for name in families.names():
        for old, new in families.get(name).renamed.items():
            if full_key == old or full_key.startswith(old + "."):
                return f"; {old} is now {new}: pass {new}{full_key[len(old) :]}=..."
    return ""


def _not_writable(err: OSError) -> str:
    where = os.path.abspath(err.filename) if err.filename else "the run dir"
    reason = err.strerror or type(err).__name__
    if is_full(err):
        return f"cannot write {where}: {reason}; free space or write elsewhere with paths.log_dir=<folder>"
    if err.errno in (errno.EACCES, errno.EPERM):  # may be a read as well as a write
        return f"{where}: {reason}; check its permissions (outputs go under paths.log_dir=<folder>)"
    return f"cannot write {where}: {reason}; pick a writable folder with paths.log_dir=<folder> or hydra.run.dir=<folder>"


def describe(err: BaseException) -> str | None:
    """One line for a Hydra composition error or a refused write; None for anything else."""
    from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException

    from genexp.errors import GenexpError

    cause = err
    while cause is not None and not isinstance(cause, GenexpError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:  # raised in a genexp resolver, e.g. hydra/launcher=slurm with trainer.devices=auto
        return str(cause)
    if isinstance(err, MissingConfigException):
        return _missing_option(err)
    if isinstance(err, OverrideParseException):
        return _bad_override(err)
    if isinstance(err, CompactHydraException):
        cause = err.__cause__
        if getattr(cause, "full_key", None) and "not in struct" in str(cause):
            return _unknown_key(err, cause)
        return "; ".join(_lines(str(err))) or type(err).__name__
    refused = write_refusal(err)
    if refused is not None:
        return _not_writable(refused)
    return None


def _bad_override(err) -> str:
    """``key=value`` Hydra cannot parse; values with characters its grammar leaves out of an
    unquoted value (non-ASCII letters, spaces) parse once quoted."""
    override = str(err.override)
    line = f"{override}: {_lines(err.message)[0]}"
    key, sep, value = override.partition("=")
    if sep and not value.startswith(("'", '"')) and any(ord(c) > 127 or c.isspace() for c in value):
        quoted = value.replace("\\", "\\\\").replace('"', '\\"')
        return f"{line}; quote a value with non-ASCII characters or spaces: '{key}=\"{quoted}\"'"
    return f"{line} (see genexp train --help for the syntax)"


def report_in_one_line(fail: Callable[[str], None]) -> None:
    """Route Hydra's error report through :func:`describe`; ``fail(line)`` prints it and exits.

    Hydra 1.3 has no hook for its report (:func:`genexp.hydra_compat.wrap_error_report`); errors
    :func:`describe` does not know keep Hydra's report."""

    def one_line(original):
        def run_and_report(func):
            def compact():
                try:
                    return func()
                except Exception as err:
                    line = None if os.environ.get("HYDRA_FULL_ERROR") == "1" else describe(err)
                    if line is None:
                        raise
                    fail(line)

            return original(compact)

        return run_and_report

    wrap_error_report(one_line)
