"""dilated-attn-transformers: LongNet dilated attention inside Hugging Face transformers models.

Importing this package registers ``"dilated"`` in transformers' ``AttentionInterface`` (the attention
function) and ``AttentionMaskInterface`` (the padding/causal mask it reads). A model then uses it with
``attn_implementation="dilated"`` and ``config.dilated_attention = {"segment_lengths": [...],
"dilation_rates": [...]}`` (optional ``"mode"``: ``"longnet"`` or ``"head_groups"``; ``"backend"``: a
``dilated_attn`` backend name such as ``"ring"``).
"""

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from dilated_attn_transformers.attention import dilated_attention_forward
from dilated_attn_transformers.config import CONFIG_KEY, DilatedAttentionConfig, dilated_attention_config
from dilated_attn_transformers.masking import DilatedMask, dilated_mask

__version__ = "0.1.0"

ATTN_IMPLEMENTATION = "dilated"


def register(name: str = ATTN_IMPLEMENTATION) -> None:
    """Register the attention and mask functions under ``name`` (done for ``"dilated"`` at import)."""
    AttentionInterface.register(name, dilated_attention_forward)
    AttentionMaskInterface.register(name, dilated_mask)


register()

__all__ = [
    "ATTN_IMPLEMENTATION",
    "CONFIG_KEY",
    "DilatedAttentionConfig",
    "DilatedMask",
    "dilated_attention_config",
    "dilated_attention_forward",
    "dilated_mask",
    "register",
    "__version__",
]
