"""The key/value cache of diffusion decoding: every position of the sequence, rewritten one window at a time.

Autoregressive caches grow by appending; a diffusion step instead re-reads the whole sequence and recomputes only
the positions whose inputs changed (the answer, or the active block of it). `DimpleDiffusionCache` keeps one
full-length buffer per layer and lets a forward overwrite a window of it in place.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer


class DimpleWindowLayer(DynamicLayer):
    """Keys/values of every position of the sequence; a forward over a window rewrites only that window.

    A full-length update (the first step, or a refresh) stores the states whole. A shorter update writes its
    states in place at `window_start` and returns the full buffers, so attention sees every position in
    sequence order while positions outside the window are neither recomputed nor reallocated. With the window
    at the end this is the reference's prefix cache; with the window on one block of the answer it is the dual
    (prefix + suffix) cache of block decoding.
    """

    def __init__(self):
        super().__init__()
        self.window_start = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self.is_initialized or self.keys.numel() == 0 or key_states.shape[-2] == self.keys.shape[-2]:
            self.keys, self.values = key_states, value_states
            return key_states, value_states
        window_end = self.window_start + key_states.shape[-2]
        if window_end > self.keys.shape[-2]:
            raise ValueError(
                f"A cached step feeds positions {self.window_start}..{window_end - 1} but the cache holds "
                f"{self.keys.shape[-2]}; run a full forward first or move the window."
            )
        self.keys[..., self.window_start : window_end, :] = key_states
        self.values[..., self.window_start : window_end, :] = value_states
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Positions before the window: where the tokens of a cached forward start."""
        return self.window_start if self.is_initialized and self.keys.numel() else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Attention always spans the whole sequence, whatever part of it the forward feeds."""
        if self.is_initialized and self.keys.numel():
            return self.keys.shape[-2], 0
        return query_length, 0


class DimpleDiffusionCache(Cache):
    """One `DimpleWindowLayer` per decoder layer, moved together by `set_window`."""

    def __init__(self, num_layers: int, window_start: int = 0):
        super().__init__(layers=[DimpleWindowLayer() for _ in range(num_layers)])
        self.set_window(window_start)

    def set_window(self, start: int) -> None:
        """Where the tokens of the next cached forward sit in the sequence."""
        for layer in self.layers:
            layer.window_start = start


def prefix_cache(num_layers: int, prefix_length: int) -> DimpleDiffusionCache:
    """The reference's cache mode: after a full first step, forwards feed everything after `prefix_length`."""
    return DimpleDiffusionCache(num_layers, prefix_length)


__all__ = ["DimpleDiffusionCache", "DimpleWindowLayer", "prefix_cache"]
