"""Serving the suite's HTTP services under uvicorn: :func:`serve.serve`, with the edge limits of
:mod:`.edge` and the quieter main loop of :mod:`.quiet_server` (both hook uvicorn's internals)."""
