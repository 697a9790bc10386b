"""The package version, in a module of its own so that `__init__` imports nothing out of order."""

__version__ = "0.2.0"
