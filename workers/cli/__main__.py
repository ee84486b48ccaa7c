"""``python -m workers.cli``: the ``roadstream`` command (worker children are started this way)."""

from workers.cli import main

main()
