"""dsv32_kernels."""
