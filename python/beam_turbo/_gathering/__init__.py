"""Gathering: how elements become batches (the one gather rule) and how big a batch is."""
