"""The HTTP edge: uvicorn, FastAPI routes, body parsing, image decoding, validation and response
encoding. It reaches the engine through an ``EngineHandle``: the engine itself when both share
one process, a ``RemoteEngine`` channel from each HTTP worker process otherwise."""
