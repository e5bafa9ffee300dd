"""The seed papers' latency tables (data, each row checked against its paper's formula) and your history beside them."""
