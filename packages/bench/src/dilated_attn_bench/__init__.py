"""dilated-attn-bench: benchmarks of every registered dilated-attention backend.

``dilated-attn-bench run`` times each backend found through ``dilated_attn.registry`` beside dense
SDPA, FlexAttention and the segment ceiling of SPEC §3, checks each against the float64 oracle, and
writes report.md, results.json, results.csv and plots; ``compare`` and ``pool`` are the other commands.
"""

import importlib.metadata

# The installed distribution's version, which the build took from the repository's VERSION file.
__version__ = importlib.metadata.version("dilated-attn-bench")
