"""Views: groups, entries and verdicts rendered from the column table (tables, Markdown, CSV, JSON, comparisons,
plots, progress)."""
