"""Sinks: the outputs of a bench, each receiving records as they come (docs/architecture.md)."""
