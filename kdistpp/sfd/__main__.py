"""`python -m kdistpp.sfd train|export ...`: see kdistpp.sfd.cli."""

import sys

from .cli import main

sys.exit(main())
