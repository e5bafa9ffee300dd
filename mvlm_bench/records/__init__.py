"""Records: one repetition with its whole configuration, its metrics, the one column table, aggregation; the
llama.cpp output parsers that fill them."""
