"""``python -m rf_callback.cli``: the ``rf-probe`` command."""

import sys

from rf_callback.cli.command import main

sys.exit(main())
