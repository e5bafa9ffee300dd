"""The benchmark history: every stored measurement with every repetition, in SQLite or PostgreSQL (docs/lab.md)."""
