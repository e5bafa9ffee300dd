"""mvlm: the application, the ``mvlm`` command (mvlm.cli); the work is done in mvlm_convert and mvlm_bench."""
