"""The one place the harness imports generated stubs from.

``dsv32_proto`` generates them from ``dsv32/serving/v1/serving.proto`` (the
public API) and ``dsv32/worker/v1/worker.proto`` (only the workers' ``Stats``,
for ``--worker-stats``) on first import; everything in this package goes
through here, so a change in how the stubs are provided touches this file only.
"""

from dsv32_proto import serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc

__all__ = ["serving_pb2", "serving_pb2_grpc", "worker_pb2", "worker_pb2_grpc"]
