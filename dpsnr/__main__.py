"""`python -m dpsnr ...` is the `dpsnr` command."""

import sys

from .cli import main

sys.exit(main())
