"""querytune: query understanding for local-service search."""

__version__ = "0.1.0"
