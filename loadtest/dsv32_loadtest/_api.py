"""The one place the harness imports the public API's generated stubs from.

``dsv32_proto`` generates them from ``dsv32/serving/v1/serving.proto`` on first
import; everything in this package goes through here, so a change in how the
stubs are provided touches this file only.
"""

from dsv32_proto import serving_pb2, serving_pb2_grpc

__all__ = ["serving_pb2", "serving_pb2_grpc"]
