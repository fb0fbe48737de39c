"""The one place that knows how the supported transformers releases differ.

transformers 5.24 renamed the key/value cache argument from `past_key_values` to `cache` in models, decoder layers,
mask builders and model outputs (the old name warns until 5.40 removes it). Dimple's own API says `cache` on every
supported release; the helpers below translate to whatever the installed transformers expects, found by looking at
its signatures rather than at version numbers, so a release that backports or reverts the rename still works.
"""

import functools
import inspect
from collections.abc import Callable
from typing import Any

from transformers.masking_utils import create_bidirectional_mask
from transformers.utils.deprecation import deprecate_kwarg

#: The keyword under which transformers' layers, mask builders and outputs take the key/value cache.
CACHE_ARG = "cache" if "cache" in inspect.signature(create_bidirectional_mask).parameters else "past_key_values"
LEGACY_CACHE_ARG = "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`{name: cache}` under the installed transformers' name, for layers, mask builders and output classes."""
    return {CACHE_ARG: cache}


def accepts_legacy_cache_name(forward: Callable) -> Callable:
    """Let a `forward(..., cache=...)` also take `past_key_values=`, the name callers used before 5.24.

    On releases that already say `cache` the old name gets transformers' own deprecation (a FutureWarning naming the
    new keyword); on older releases it is still the current name and is taken silently. Both at once is an error
    everywhere: which one was meant cannot be known.
    """
    renamed = deprecate_kwarg(LEGACY_CACHE_ARG, "5.40.0", new_name="cache")(forward) if CACHE_ARG == "cache" else None

    @functools.wraps(forward)
    def forward_with_legacy_name(*args, **kwargs):
        if LEGACY_CACHE_ARG in kwargs:
            if kwargs.get("cache") is not None:
                raise ValueError("Pass the key/value cache once, as `cache=` (not also as `past_key_values=`).")
            if renamed is not None:
                return renamed(*args, **kwargs)
            kwargs["cache"] = kwargs.pop(LEGACY_CACHE_ARG)
        return forward(*args, **kwargs)

    return forward_with_legacy_name


__all__ = ["CACHE_ARG", "cache_kwargs", "accepts_legacy_cache_name"]
