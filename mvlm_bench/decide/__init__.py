"""Deciding: statistics (stats), the regression gate (gate), and the verdict pipeline (verdict); no printing."""
