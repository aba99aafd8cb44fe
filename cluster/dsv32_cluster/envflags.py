"""Command-line flags whose defaults come from ``DSV32_<FLAG>`` environment variables.

Every flag of the router and the workers may be set from the environment
(``--max-num-seqs`` ← ``DSV32_MAX_NUM_SEQS``), which is how the Helm chart and
the Ray app configure them. A value that does not parse is a one-line error
that names the variable, before anything starts::

    DSV32_PORT='abc': not an integer (sets --port)

An empty variable counts as unset (the chart leaves empty values out too).
Torch-free and engine-free: the router uses it.
"""

from __future__ import annotations

import argparse
import os

_KINDS = {int: "an integer", float: "a number"}
_FALSE = ("0", "false", "no")


def env_var(flag: str) -> str:
    """``--max-num-seqs`` → ``DSV32_MAX_NUM_SEQS``."""
    return "DSV32_" + flag.lstrip("-").replace("-", "_").upper()


def env_default(flag: str, default=None, type=str):
    """The default of ``flag``: its variable parsed with ``type`` when set, else ``default``.

    ``type=bool`` (a switch): anything but 0 / false / no is on. A value that
    does not parse, or is not one of ``choices``, exits with one line naming the variable.
    """
    var = env_var(flag)
    raw = os.environ.get(var, "")
    if raw == "":
        return default
    if type is bool:
        return raw.strip().lower() not in _FALSE
    try:
        return type(raw)
    except (TypeError, ValueError):
        raise SystemExit(f"{var}={raw!r}: not {_KINDS.get(type, 'a valid value')} (sets {flag})") from None


def add_env_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, *, type=str, default=None,
                     help: str = "", choices=None, **kwargs) -> argparse.Action:
    """``p.add_argument(flag, ...)`` with ``env_default`` as the default and the variable named in the help.
    ``type=bool`` makes a switch (``store_true``)."""
    var = env_var(flag)
    value = env_default(flag, default, type)
    if choices is not None and value is not None and value not in choices:
        raise SystemExit(f"{var}={value!r}: not one of {', '.join(map(str, choices))} (sets {flag})")
    help = f"{help} [{var}]".strip()
    if type is bool:
        return p.add_argument(flag, action="store_true", default=value, help=help, **kwargs)
    return p.add_argument(flag, type=type, default=value, choices=choices, help=help, **kwargs)
