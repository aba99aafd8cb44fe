"""The one command line: ``dsv32-serve <command> ...``.

Each command lives in the module that owns it and exposes
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only
when their command runs, so ``dsv32-serve router`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("dsv32_serve.demo", "the embedded default: tiny checkpoint, local cluster, a few requests"),
    "up": ("dsv32_serve.up", "start redis, a router, prefill and decode workers on this machine "
                               "(--colocated: the baseline, workers doing both)"),
    "router": ("dsv32_router.server", "run the public gRPC router"),
    "prefill": ("dsv32_prefill.worker", "run a prefill worker"),
    "decode": ("dsv32_decode.worker", "run a decode worker"),
    "colocated": ("dsv32_decode.colocated", "run a colocated worker (prefill and decode in one process: the baseline)"),
    "generate": ("dsv32_serve.generate", "generate text offline (--model) or from a cluster (--target)"),
    "chat": ("dsv32_serve.chat", "interactive chat with the DeepSeek-V3.2 chat encoding"),
    "make-checkpoint": ("dsv32_serve.make_checkpoint", "write a random-weights checkpoint in HF layout"),
    "bench": ("dsv32_serve.bench", "benchmarks: engine | kernels | transfer | ep"),
    "loadtest": ("dsv32_loadtest.cli", "load-test a running cluster through the gRPC API"),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("dsv32-serve")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "0+unknown"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after every flag's help, except where there is nothing to say."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        help = action.help or ""
        return help if "%(default)" in help else f"{help} (default: %(default)s)".lstrip()


# Start failures that are the user's to fix (a bad path, a missing optional dependency, a bad
# value): one line on stderr and exit status 2, no traceback (DSV32_TRACEBACK=1 shows it).
_ONE_LINE = (OSError, ImportError, ValueError)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv32-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dsv32-serve {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
        p.add_argument("--version", action="version", version=f"dsv32-serve {version()}")
        # Only the chosen command's module is imported (its arguments are needed);
        # the others stay unimported so that light commands stay light.
        if name == wanted:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)  # imports the command's module
    except ImportError as exc:
        print(f"dsv32-serve {argv[0]}: {_one_line(exc)}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A config or checkpoint we cannot serve: one line, not a traceback. Only a command
        # that imported the engine can raise ConfigError, so the others never import it.
        config = sys.modules.get("dsv32_engine.config")
        known = isinstance(exc, _ONE_LINE) or (config is not None and isinstance(exc, config.ConfigError))
        if not known or os.environ.get("DSV32_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"dsv32-serve {args.command}: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ModuleNotFoundError):
        return f"missing optional dependency {exc.name!r} (pip install it; see requirements.txt)"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
