"""``python -m nlsq_stream.cli``: the ``nlsq-stream`` command."""

import sys

from . import main

sys.exit(main())
