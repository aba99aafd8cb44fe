"""dsv32_prefill."""
