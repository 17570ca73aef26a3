"""The ``kubernetes`` backend: :mod:`.backend` (the only importer of the ``kubernetes`` client) and
the pure builders and readers of its objects (:mod:`.objects`)."""
