"""``python -m ckptio.cli``: the same as the ``ckptio`` console script."""

import sys

from . import main

sys.exit(main())
