"""dsv32_decode."""
