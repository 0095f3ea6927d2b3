"""The version of the installed ``dilated-attn-core``, which its build took from the repository's VERSION file."""

import importlib.metadata

__version__ = importlib.metadata.version("dilated-attn-core")
