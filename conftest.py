"""Repository-level pytest configuration (doctest collection of src/kdkit)."""

# Needs the optional triton package, and must be imported only after TRITON_INTERPRET is
# decided (tests/losses/test_triton_kernel.py); it has no doctests.
collect_ignore = ["src/kdkit/losses/kernels/triton_kernel.py"]
