"""``config.dilated_attention``: the dilation pattern, mode and backend a model's attention layers use."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dilated_attn import DilationPattern
from dilated_attn.pattern import MODES

CONFIG_KEY = "dilated_attention"
_REQUIRED = ("segment_lengths", "dilation_rates")
_OPTIONAL = ("mode", "backend")
_EXAMPLE = '{"segment_lengths": [2048, 4096], "dilation_rates": [1, 2], "mode": "longnet"}'


@dataclass(frozen=True)
class DilatedAttentionConfig:
    """The parsed ``config.dilated_attention`` entry."""

    pattern: DilationPattern
    mode: str = "longnet"
    backend: str = "auto"


def dilated_attention_config(config: Any) -> DilatedAttentionConfig:
    """Parse and validate ``config.dilated_attention`` of a transformers ``PretrainedConfig``.

    Raises:
        ValueError / TypeError: naming ``config.dilated_attention``, the value and the rule.
    """
    raw = getattr(config, CONFIG_KEY, None)
    if raw is None:
        raise ValueError(
            f"attn_implementation='dilated' needs config.{CONFIG_KEY}, e.g. {_EXAMPLE}; "
            f"{type(config).__name__} has none"
        )
    if not isinstance(raw, Mapping):
        raise TypeError(f"config.{CONFIG_KEY}={raw!r} must be a dict such as {_EXAMPLE}")
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise ValueError(f"config.{CONFIG_KEY}={dict(raw)!r} lacks {missing}; it must look like {_EXAMPLE}")
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ValueError(
            f"config.{CONFIG_KEY} has unknown keys {unknown}; the keys are {list(_REQUIRED + _OPTIONAL)}"
        )
    try:
        pattern = DilationPattern(raw["segment_lengths"], raw["dilation_rates"])
    except (TypeError, ValueError) as err:
        raise type(err)(f"config.{CONFIG_KEY}: {err}") from err
    mode = raw.get("mode", "longnet")
    if mode not in MODES:
        raise ValueError(f"config.{CONFIG_KEY}['mode']={mode!r} must be one of {MODES}")
    backend = raw.get("backend", "auto")
    if not isinstance(backend, str):
        raise TypeError(
            f"config.{CONFIG_KEY}['backend']={backend!r} must be a backend name (str), e.g. 'ring'"
        )
    return DilatedAttentionConfig(pattern=pattern, mode=mode, backend=backend)
