"""``python -m dsv32_proto [--force]``: generate the gRPC stubs now (build step)."""

import sys

from . import generate

if __name__ == "__main__":
    print(generate(force="--force" in sys.argv[1:]))
