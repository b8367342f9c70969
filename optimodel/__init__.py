"""Optimodel's shared contract: the API types, cache key, artifact layout, storage and CLI."""

__version__ = "0.1.0"
