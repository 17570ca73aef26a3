"""The ``local`` backend: apps as processes of this host. :mod:`.backend` holds the backend
class; the other modules each do one job for it (see its docstring)."""
