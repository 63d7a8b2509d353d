"""``python -m controlplane.cli``: the same as the ``offloadctl`` script."""

from controlplane.cli import main

main()
