"""The ``docker`` backend: :mod:`.backend` and :mod:`.output` (the only importers of the Docker
SDK), and the pure builder of its containers (:mod:`.spec`)."""
