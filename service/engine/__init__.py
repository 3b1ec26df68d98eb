"""The inference engine, one process per device: the model, the tier state, the dynamic
batcher in front of the core's early-exit pipeline, and (``remote``) its side of the channel
that HTTP worker processes reach it through."""
