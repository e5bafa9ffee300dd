"""``python -m mvlm``: the ``mvlm`` command."""

from mvlm.cli import main

main()
