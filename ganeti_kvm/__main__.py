"""``python -m ganeti_kvm``: the ``ganeti-kvm`` command."""

import sys

from ganeti_kvm.tools.cli import main

sys.exit(main())
