"""Deprecated alias of GLoRA's training tools, kept for one release.

GLoRA's supernet sampling and evolutionary search live in :mod:`jlora.optim`
(``jlora.optim.glora_sample``, ``glora_fix``, ``glora_search``, ...), next to
the other training tools; the layer math is in :mod:`jlora.methods.glora`.
The old names here still work and warn (``DeprecationWarning``):

``sample``, ``fix``, ``search``, ``param_count``, ``current``, ``layers`` and
``describe`` are ``jlora.optim.glora_<name>``; ``SearchResult`` is
``jlora.optim.GLoRASearchResult``.
"""

from __future__ import annotations

import warnings
from typing import Any

from jlora.optim import _glora

_RENAMED = {"sample": "glora_sample", "fix": "glora_fix", "search": "glora_search",
            "param_count": "glora_param_count", "current": "glora_current",
            "layers": "glora_layers", "describe": "glora_describe",
            "SearchResult": "GLoRASearchResult", "Choices": "Choices"}

__all__ = sorted(_RENAMED)


def __getattr__(name: str) -> Any:
    if name not in _RENAMED:
        raise AttributeError(f"module 'jlora.glora' has no attribute {name!r}")
    new = _RENAMED[name]
    warnings.warn(f"jlora.glora.{name} is deprecated; use jlora.optim.{new}",
                  DeprecationWarning, stacklevel=2)
    return getattr(_glora, new)
