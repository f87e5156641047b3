"""Decoder caches: a Hugging Face model whose outputs hold a key/value cache is captured with
``use_cache=False`` on capture's copy (a cache is an object a graph cannot return)."""
from __future__ import annotations

from typing import Any

import torch.nn as nn
import torch.utils._pytree as pytree


def _is_cache(value: Any) -> bool:
    """A Hugging Face key/value cache (``DynamicCache`` and the other ``Cache`` classes)."""
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers") for c in type(value).__mro__)


def _cache_fields(reference: Any) -> list[str]:
    """Where the model's outputs hold a cache: the output field's name, else its type."""
    if isinstance(reference, dict):
        return [str(k) for k, v in reference.items() if _is_cache(v)]
    return [type(v).__name__ for v in pytree.tree_leaves(reference) if _is_cache(v)]


def _turn_cache_off(root: nn.Module, reference: Any) -> bool:
    """Set ``config.use_cache = False`` on capture's copy where the model's config asks for a
    cache and its outputs hold one: a cache is a Python object with its own update logic, not a
    value a graph returns, and a model run for inference once per input needs none."""
    config = getattr(root, "config", None)
    if not getattr(config, "use_cache", False) or not any(_is_cache(v) for v in pytree.tree_leaves(reference)):
        return False
    config.use_cache = False
    return True
