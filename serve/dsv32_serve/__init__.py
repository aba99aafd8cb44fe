"""dsv32_serve: the front door. The ``dsv32-serve`` command line and what only it runs:
``demo``, ``up``, ``generate``, ``chat``, ``make-checkpoint`` and the ``bench`` dispatch.

Nothing in the project imports this package; it imports every other one.
"""
