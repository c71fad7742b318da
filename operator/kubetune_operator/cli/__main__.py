"""`python -m kubetune_operator.cli`: the same as the `kubetune` command."""

import sys

from kubetune_operator.cli.main import main

sys.exit(main())
