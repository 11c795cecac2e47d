"""The kdkit version (one place, read by ``kdkit.__version__`` and the cache manifest)."""

__version__ = "0.1.0"
