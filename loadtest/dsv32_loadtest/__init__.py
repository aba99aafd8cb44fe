"""dsv32_loadtest."""
