"""The one command line: ``dsv32-serve <command> ...``.

Each command lives in the module that owns it and exposes
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only
when their command runs, so ``dsv32-serve router`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
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


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv32-serve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported (its arguments are needed);
        # the others stay unimported so that light commands stay light.
        if name == wanted:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A config or checkpoint we cannot serve: one line, not a traceback. Only a command
        # that imported the engine can raise ConfigError, so the others never import it.
        config = sys.modules.get("dsv32_engine.config")
        if config is None or not isinstance(exc, config.ConfigError):
            raise
        print(f"dsv32-serve {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
