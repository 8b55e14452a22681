"""PyTorch helpers of the PyTorch and HuggingFace handlers (imports torch: import it only from
those handlers)."""
