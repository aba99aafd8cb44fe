"""dsv32_router."""
