"""The DoFns: each a composition of the gatherer and an action (emit, or run through the batch
runner), or Beam's inference DoFn with the batch runner."""
