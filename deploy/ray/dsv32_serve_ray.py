"""Launch dsv32-serve as a Ray Serve application (router, prefill and decode deployments).

    python deploy/ray/dsv32_serve_ray.py --model checkpoints/tiny [--redis-url URL] [--address auto]

A thin launcher: the application is ``dsv32_serve.ray_app`` (installed with
this repository, on every node), so Ray pickles its replica classes by
reference. See ``deploy/README.md`` and ``--help``.
"""

import sys

from dsv32_serve.ray_app import main

if __name__ == "__main__":
    sys.exit(main())
