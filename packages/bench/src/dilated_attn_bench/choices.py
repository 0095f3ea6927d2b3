"""Names the command line offers, kept free of torch so that ``--help`` answers at once.

``presets.py`` and the studies build their tables from these names; tests check that they agree.
"""

PRESET_NAMES = ("longnet-1m", "longnet-256k", "paper", "seed-fp32", "cpu-quick")
GPU_DEFAULT_PRESETS = ("longnet-256k", "longnet-1m")
CPU_DEFAULT_PRESETS = ("cpu-quick",)
DTYPE_NAMES = ("fp32", "fp16", "bf16", "fp64")
MODES = ("longnet", "head_groups")
# Block-sparse pattern kinds, in the order each study runs them.
SPARSE_KINDS = ("local_window", "random_blocks", "dilated_blocks")
FLEX_TUNING_KINDS = ("local_window", "dilated_blocks", "random_blocks")
