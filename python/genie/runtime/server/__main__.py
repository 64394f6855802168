"""``python -m genie.runtime.server``: the same as ``genie serve``."""

import sys

from genie.runtime.server.cli import main

sys.exit(main())
