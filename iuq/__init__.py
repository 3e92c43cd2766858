"""iuq: Instance-Unique Querying for query-based instance segmenters."""

__version__ = "0.1.0"
