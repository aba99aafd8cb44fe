"""Children that die with their parent (Linux ``PR_SET_PDEATHSIG``), without ``preexec_fn``.

``dsv32-serve up`` must leave no orphans even when it is killed with SIGKILL.
The kernel can send a child a signal when its parent dies, but the child has
to ask for it itself, and ``preexec_fn`` (the usual way) is unsafe in a
process that has threads. So:

* Python children (router, workers) get ``DSV32_PARENT_PID`` in their
  environment and call :func:`die_with_parent` first thing in ``run()``;
* other programs (``redis-server``) are started through
  ``python -m dsv32_cluster.parent PARENT_PID PROGRAM ARGS...``, which asks for
  the signal and then ``exec``s the program (the setting survives ``exec``).

Either way the child checks, after asking, that its parent is still the one
it was started by: a parent that died before the request leaves no signal
to come, so the child exits at once.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

ENV = "DSV32_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def _prctl_pdeathsig(sig: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """If started by a parent that asked for it (``DSV32_PARENT_PID``), get ``sig`` when it dies."""
    want = os.environ.get(ENV)
    if not want:
        return
    _prctl_pdeathsig(sig)
    if os.getppid() != int(want):
        os.kill(os.getpid(), sig)


def wrap(argv: list[str], parent_pid: int | None = None) -> list[str]:
    """The command line that runs ``argv`` as a child that dies with ``parent_pid`` (default: this process)."""
    return [sys.executable, "-m", "dsv32_cluster.parent", str(parent_pid or os.getpid()), *argv]


def main(argv: list[str]) -> None:
    parent, program = int(argv[0]), argv[1:]
    _prctl_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:
        sys.exit(1)
    os.execvp(program[0], program)


if __name__ == "__main__":
    main(sys.argv[1:])
