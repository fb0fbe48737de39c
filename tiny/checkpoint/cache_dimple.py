"""The key/value cache of diffusion decoding: every position of the sequence, rewritten one window at a time.

Autoregressive caches grow by appending; a diffusion step instead re-reads the whole sequence and recomputes only
the positions whose inputs changed (the answer, or the active block of it). `DimpleDiffusionCache` keeps one
full-length buffer per layer and lets a forward overwrite a window of it in place.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer


class DimpleWindowLayer(DynamicLayer):
    """Keys/values of every position of the sequence; a forward over a window rewrites only that window.

    A full-length update (the first step, or a refresh) overwrites the buffers whole. A shorter update writes its
    states in place at `window_start`; both return the full buffers, so attention sees every position in
    sequence order while positions outside the window are neither recomputed nor reallocated. With the window
    at the end this is the reference's prefix cache; with the window on one block of the answer it is the dual
    (prefix + suffix) cache of block decoding.
    """

    def __init__(self):
        super().__init__()
        self.window_start = 0  # for the host (positions, errors); compiled steps read `window_offset` instead
        self.window_offset: torch.Tensor | None = None

    def set_window(self, start: int) -> None:
        """Where the next cached forward writes. The start is also kept as a 0-d tensor at a fixed address: a
        compiled step that read the int would be specialised on it and recompiled for every block and prompt."""
        self.window_start = start
        if self.window_offset is not None:
            self.window_offset.fill_(start)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Buffers as long as the first forward, which must feed the whole sequence, kept at fixed addresses.

        Every later forward writes into them in place, and marking the addresses static lets a compiled window step
        mutate them under CUDA graphs (as transformers' StaticCache does); the full passes that fill them run
        eagerly, outside any graph."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = torch.zeros_like(key_states, memory_format=torch.contiguous_format)
        self.values = torch.zeros_like(value_states, memory_format=torch.contiguous_format)
        self.window_offset = torch.tensor(self.window_start, device=self.device)
        if not torch.compiler.is_compiling():
            for buffer in (self.keys, self.values, self.window_offset):
                torch._dynamo.mark_static_address(buffer)
            for buffer in (self.keys, self.values):  # batch and sequence length vary between requests
                torch._dynamo.maybe_mark_dynamic(buffer, 0)
                torch._dynamo.maybe_mark_dynamic(buffer, 2)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = key_states.shape[-2]
        if length == self.keys.shape[-2]:
            self.keys.copy_(key_states)
            self.values.copy_(value_states)
            return self.keys, self.values
        if not torch.compiler.is_compiling() and self.window_start + length > self.keys.shape[-2]:
            raise ValueError(
                f"A cached step feeds positions {self.window_start}..{self.window_start + length - 1} but the cache "
                f"holds {self.keys.shape[-2]}; run a full forward first or move the window."
            )
        positions = self.window_offset + torch.arange(length, device=self.device)
        self.keys.index_copy_(-2, positions, key_states)
        self.values.index_copy_(-2, positions, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int | torch.Tensor:
        """Positions before the window: where the tokens of a cached forward start. Inside a compiled step it is the
        0-d tensor (as transformers' StaticLayer returns one): transformers 5.12's mask builders read it there, and
        an int would specialise the graph on every block and prompt length."""
        if not self.is_initialized:
            return 0
        return self.window_offset if torch.compiler.is_compiling() else self.window_start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Attention always spans the whole sequence, whatever part of it the forward feeds."""
        if self.is_initialized:
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
            layer.set_window(start)

    def get_query_offset(self, layer_idx: int = 0) -> int | torch.Tensor:
        """Where the window's queries start, for transformers' mask builders: as a tensor once the buffers exist,
        so a compiled step is not specialised on the window (transformers' StaticLayer does the same)."""
        layer = self.layers[layer_idx]
        return layer.window_offset if layer.window_offset is not None else layer.window_start


def prefix_cache(num_layers: int, prefix_length: int) -> DimpleDiffusionCache:
    """The reference's cache mode: after a full first step, forwards feed everything after `prefix_length`."""
    return DimpleDiffusionCache(num_layers, prefix_length)


__all__ = ["DimpleDiffusionCache", "DimpleWindowLayer", "prefix_cache"]
