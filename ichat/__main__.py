"""``python -m ichat``: the ``ichat`` command (see ichat.cli)."""

import sys

from ichat.cli.main import main

# The guard matters: vLLM's engine core is a spawned subprocess that re-imports this module.
if __name__ == "__main__":
    sys.exit(main())
