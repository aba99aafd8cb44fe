"""dsv32_proto."""
