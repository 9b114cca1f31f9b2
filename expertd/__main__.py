"""``python -m expertd`` runs the daemon, like the ``expertd`` command."""

import sys

from expertd.main import main

sys.exit(main())
