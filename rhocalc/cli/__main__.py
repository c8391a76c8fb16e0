"""``python -m rhocalc.cli``, the same as the ``rhocalc`` command."""

import sys

from . import main

sys.exit(main())
