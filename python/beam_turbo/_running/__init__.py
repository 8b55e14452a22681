"""Running one batch: the batch runner, model loading, dead letters, memory failures, the
collector pause."""
