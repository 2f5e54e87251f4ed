"""Sluice core: settings, database engine, blob store, logging and the CLI."""

__version__ = "0.1.0"
