"""The default limits of `mvlm verify` (relative errors), apart from mvlm_convert.verify so that the CLI can show
them in --help without importing numpy at start-up."""

DEFAULT_IMAGE_THRESHOLD = 5e-3
DEFAULT_LOGITS_THRESHOLD = 2e-3

