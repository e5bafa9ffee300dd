"""``python -m mvlm``: the ``mvlm`` command."""

from mvlm.entry import main

main()
