"""Building arrays and results: ``stack``, a handler's batch, ``PredictionResult``s."""
