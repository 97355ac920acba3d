"""``python -m dmdiff``: the ``dmdiff`` command line (:mod:`dmdiff.cli`)."""

import sys

from dmdiff.cli import entry

sys.exit(entry())
