"""dsv32_router: the public gRPC API (validation, pair policy, orchestration, streaming) and its client."""
