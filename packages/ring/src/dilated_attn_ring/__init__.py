"""dilated-attn-ring: exact LongNet dilated attention on a sequence split across ``torch.distributed`` ranks.

``ring_dilated_attention(q, k, v, segment_lengths, dilation_rates, group=...)`` on each rank's
contiguous chunk ``(b, n_local, h, d)``; registered as the "ring" backend of ``dilated_attn``.
"""

import importlib.metadata

from dilated_attn_ring.functional import ring_dilated_attention

# The installed distribution's version, which the build took from the repository's VERSION file.
__version__ = importlib.metadata.version("dilated-attn-ring")

__all__ = ["ring_dilated_attention", "__version__"]
