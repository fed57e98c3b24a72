"""``python -m dspy_infra.cli``: the ``dspy-infra`` command."""

import sys

from . import main

sys.exit(main())
