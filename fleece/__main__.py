"""``python -m fleece`` is the ``fleece`` command."""

from fleece.cli import main

raise SystemExit(main())
