"""Test-session set-up."""

# TensorFlow imported before torch's triton aborts the process when both are installed (two LLVM
# copies register the same options), and transformers imports triton after TensorFlow when the
# tests have imported it. In the test process, triton comes first. (beam-turbo itself imports
# no framework the user has not: tests/test_patch.py checks that in fresh interpreters.)
try:
    import torch  # noqa: F401
    import triton  # noqa: F401
except ImportError:
    pass
