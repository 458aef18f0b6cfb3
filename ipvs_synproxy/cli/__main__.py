"""``python -m ipvs_synproxy.cli``: the ``ipvs-synproxy`` command."""

import sys

from ipvs_synproxy.cli.main import main

sys.exit(main())
