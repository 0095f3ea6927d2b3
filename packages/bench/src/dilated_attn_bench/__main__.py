"""``python -m dilated_attn_bench``: the same as the ``dilated-attn-bench`` command."""

import sys

from dilated_attn_bench.cli import main

sys.exit(main())
