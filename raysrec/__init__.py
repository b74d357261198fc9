"""raysrec: sequential recommenders from raw interaction logs to a served endpoint, on Ray."""

__version__ = "0.1.0"
