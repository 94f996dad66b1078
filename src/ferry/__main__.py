"""``python -m ferry`` runs the same CLI as the ``ferry`` console script."""

from ferry.cli import main

raise SystemExit(main())
