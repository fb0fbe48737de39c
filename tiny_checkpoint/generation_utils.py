"""Discrete-diffusion decoding for Dimple: `generate()` fills a canvas of `<|mask|>` tokens over a few passes.

Read top to bottom, `DimpleGenerationMixin.generate` does:
1. prepare: resolve the generation config, validate, append the mask canvas (or a structure-prior template);
2. encode once: prompt embeddings with image features merged, M-RoPE positions for prompt + canvas;
3. step 0: a full forward; with `use_cache` the prompt's keys/values (all but its last token) are kept as a
   read-only prefix, computed while the answer was all masks (the released semantics);
4. each step: forward (the full sequence, or the last prompt token + canvas against the prefix), the LM head
   only where a mask waits for a token, propose tokens, commit per row (threshold, else schedule);
5. finish when no mask is left (or after `steps`), return sequences and decoding statistics.

The selection rules are small pure functions over (batch, answer) grids. Unlike the reference, every count and
every top-k is computed per row, so a row's answer never depends on its batch mates; at batch size 1 the
arithmetic (float32 schedule, strict `>` threshold, argmax and confidence definitions) is the reference's.
"""

import copy
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import CompileConfig, GenerationConfig, GenerationMixin
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
from transformers.utils import ModelOutput, logging

from .cache_dimple import DimpleDiffusionCache

ALGORITHMS = ("origin", "origin-ratio", "autoregressive", "maskgit_plus", "topk_margin", "entropy")
PIPELINES = ("dim", "dream")
# One step is one forward pass; more than this is a typo (or a unit mix-up), never a decoding plan.
MAX_STEPS = 10_000
# Every returned sequence is a row of every step's batch; beyond this the canvas alone exhausts memory.
MAX_RETURN_SEQUENCES = 1024
TOKEN_ID_KEYS = ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id")
VISION_TOKEN_KEYS = (
    "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "vision_token_id"
)
# `do_sample=True` without a temperature samples at transformers' own default temperature.
DEFAULT_SAMPLING_TEMPERATURE = 1.0
# Pipeline defaults that only apply when sampling (transformers' pipelines drop them otherwise, too).
PIPELINE_SAMPLING_SETTINGS = ("temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff",
                              "eta_cutoff")

# Standard transformers generation settings that diffusion decoding does not implement: each is accepted at None
# or at the listed values (where it changes nothing) and refused otherwise, naming why.
BEAM_SEARCH = "beam search (a diffusion step commits tokens in parallel; there are no beams)"
AUTOREGRESSIVE = "an autoregressive decoding rule (it acts on a left-to-right prefix, which a diffusion canvas has not)"
ASSISTED = "assisted/speculative decoding (nothing to draft: the canvas is filled in parallel)"
UNSUPPORTED_SETTINGS: dict[str, tuple[tuple[Any, ...], str]] = {
    "num_beams": ((1,), BEAM_SEARCH),
    "num_beam_groups": ((1,), BEAM_SEARCH),
    "diversity_penalty": ((0.0,), BEAM_SEARCH),
    "length_penalty": ((1.0,), BEAM_SEARCH),
    "early_stopping": ((False,), BEAM_SEARCH),
    "constraints": ((), BEAM_SEARCH),
    "force_words_ids": ((), BEAM_SEARCH),
    "low_memory": ((False,), BEAM_SEARCH),
    "penalty_alpha": ((0.0,), "contrastive search (an autoregressive decoding rule)"),
    "dola_layers": ((), "DoLa decoding (an autoregressive decoding rule)"),
    "no_repeat_ngram_size": ((0,), AUTOREGRESSIVE),
    "encoder_no_repeat_ngram_size": ((0,), "an encoder-decoder rule (Dimple is decoder-only)"),
    "encoder_repetition_penalty": ((1.0,), "an encoder-decoder rule (Dimple is decoder-only)"),
    "decoder_start_token_id": ((), "an encoder-decoder setting (Dimple is decoder-only)"),
    "forced_bos_token_id": ((), AUTOREGRESSIVE),
    "forced_eos_token_id": ((), AUTOREGRESSIVE),
    "begin_suppress_tokens": ((), AUTOREGRESSIVE),
    "exponential_decay_length_penalty": ((), AUTOREGRESSIVE),
    "sequence_bias": ((), AUTOREGRESSIVE),
    "min_length": ((0,), "a total-length rule; use min_new_tokens, which diffusion decoding implements"),
    "max_time": ((), "a time limit (not implemented; bound the work with steps instead)"),
    "typical_p": ((1.0,), "typical sampling (not implemented; use top_p/top_k)"),
    "min_p": ((0.0,), "min-p sampling (not implemented; use top_p/top_k)"),
    "top_h": ((), "top-h sampling (not implemented; use top_p/top_k)"),
    "epsilon_cutoff": ((0.0,), "epsilon sampling (not implemented; use top_p/top_k)"),
    "eta_cutoff": ((0.0,), "eta sampling (not implemented; use top_p/top_k)"),
    "renormalize_logits": ((False,), "logits processors (not implemented)"),
    "remove_invalid_values": ((False,), "logits processors (not implemented; NaN/inf logits are reported)"),
    "guidance_scale": ((1.0,), "classifier-free guidance (not implemented)"),
    "watermarking_config": ((), "watermarking (not implemented)"),
    "token_healing": ((False,), "token healing (not implemented)"),
    "output_attentions": ((False,), "per-step attentions (not returned; run the model's forward for them)"),
    "output_hidden_states": ((False,), "per-step hidden states (not returned; run the model's forward for them)"),
    "output_logits": ((False,), "per-step logits (not returned; output_scores=True gives per-step confidences)"),
    "cache_implementation": ((), "transformers' cache types (diffusion decoding uses its own prefix cache)"),
    "cache_config": ((), "transformers' cache types (diffusion decoding uses its own prefix cache)"),
    "max_cache_len": ((), "transformers' cache types (diffusion decoding uses its own prefix cache)"),
    "prefill_chunk_size": ((), "chunked prefill (not implemented)"),
    "continuous_batching_config": ((), "continuous batching (not implemented)"),
    "disable_compile": ((False,), "transformers' automatic compilation (use compile_forward)"),
    "is_assistant": ((False,), ASSISTED),
    "num_assistant_tokens": ((20,), ASSISTED),
    "num_assistant_tokens_schedule": (("constant",), ASSISTED),
    "assistant_confidence_threshold": ((0.4,), ASSISTED),
    "assistant_lookbehind": ((10,), ASSISTED),
    "target_lookbehind": ((10,), ASSISTED),
    "assistant_early_exit": ((), ASSISTED),
    "assistant_ensemble_weight": ((), ASSISTED),
    "prompt_lookup_num_tokens": ((), ASSISTED),
    "max_matching_ngram_size": ((), ASSISTED),
    "speculation_type": ((), ASSISTED),
    "use_mtp": ((False,), ASSISTED),
}
# Arguments of transformers' generate() (not config fields): accepted when None, False or empty, refused otherwise.
UNSUPPORTED_GENERATE_ARGUMENTS: dict[str, str] = {
    "logits_processor": "custom logits processors (use generation_logits_hook_func)",
    "stopping_criteria": "custom stopping criteria (diffusion decoding stops when no mask is left)",
    "prefix_allowed_tokens_fn": "prefix-constrained decoding (use response_template)",
    "assistant_model": ASSISTED,
    "assistant_tokenizer": ASSISTED,
    "negative_prompt_ids": "classifier-free guidance (not implemented)",
    "negative_prompt_attention_mask": "classifier-free guidance (not implemented)",
    "synced_gpus": "synchronised multi-GPU generation (not implemented)",
    "custom_generate": "Hub custom_generate code (Dimple's generate is the diffusion decoder)",
}

logger = logging.get_logger(__name__)


class DimpleGenerationConfig(GenerationConfig):
    """Settings of diffusion decoding.

    Defaults give the paper's fast path, deterministically: confident decoding (commit every masked position
    whose confidence exceeds `alg_p_threshold` = 0.95, else the most confident ones by the timestep schedule,
    `alg="maskgit_plus"`), greedy tokens (`temperature=0`) and the prefix cache (`use_cache=True`).

    Args:
        max_new_tokens: answer length, i.e. number of mask slots (default 64). `max_length` (prompt + answer)
            is honoured when given instead.
        steps: maximum number of denoising steps (default: `max_new_tokens`, one token per step at worst).
        eps: last value of the timestep grid `linspace(1, eps, steps + 1)`.
        alg: how positions are chosen: one of `ALGORITHMS`.
        alg_temp: > 0 samples positions from softmax(confidence / alg_temp) instead of taking the top ones.
        alg_p_threshold: confident-decoding threshold in [0, 1] (`dim` pipeline); None or 0 disables it.
        use_original_confidence: confidences from the unfiltered softmax (`dim` pipeline).
        decoding_pipeline: `"dim"` (Dimple's: threshold + snapped schedule, stops when done) or `"dream"`
            (Dream's: exactly `steps` iterations, linear schedule).
        temperature, top_p, top_k: token sampling (temperature 0 = argmax).
        use_cache: cache keys/values between steps: the prompt's (reference mode) or, with `block_length`, every
            position outside the active block (dual cache, refreshed once per block).
        block_length: decode the answer block by block, left to right (Fast-dLLM style); confident decoding and
            the schedule (`steps` shared evenly among blocks) act inside the active block. None (default) or a
            length >= the answer is the reference's single-block decoding.
        compile_forward: run every step's forward through `torch.compile` (`compile_config`, default mode
            "default"); with the cache, all steps after the first have one static shape. The LM head then runs on
            the whole window (a static shape) and the masked rows are picked afterwards.
        output_history / return_dict_in_generate / num_return_sequences: as in transformers.
    """

    def __init__(self, **kwargs):
        # Like transformers' DiffusionGemma config, the autoregressive fields of the parent are not wanted here.
        self.max_new_tokens: int | None = kwargs.pop("max_new_tokens", 64)
        self.max_length: int | None = kwargs.pop("max_length", None)
        self.steps: int | None = kwargs.pop("steps", None)
        self.eps: float = kwargs.pop("eps", 1e-3)
        self.alg: str = kwargs.pop("alg", "maskgit_plus")
        self.alg_temp: float | None = kwargs.pop("alg_temp", None)
        self.alg_p_threshold: float | None = kwargs.pop("alg_p_threshold", 0.95)
        self.use_original_confidence: bool = kwargs.pop("use_original_confidence", True)
        self.decoding_pipeline: str = kwargs.pop("decoding_pipeline", "dim")
        self.temperature: float | None = kwargs.pop("temperature", None)
        self.do_sample: bool = kwargs.pop("do_sample", False)
        self.top_p: float | None = kwargs.pop("top_p", None)
        self.top_k: int | None = kwargs.pop("top_k", None)
        self.use_cache: bool = kwargs.pop("use_cache", True)
        self.block_length: int | None = kwargs.pop("block_length", None)
        self.compile_forward: bool = kwargs.pop("compile_forward", False)
        compile_config = kwargs.pop("compile_config", None)
        self.compile_config = CompileConfig(**compile_config) if isinstance(compile_config, dict) else compile_config
        self.num_return_sequences: int = kwargs.pop("num_return_sequences", 1)
        self.return_dict_in_generate: bool = kwargs.pop("return_dict_in_generate", False)
        self.output_history: bool = kwargs.pop("output_history", False)
        self.output_scores: bool = kwargs.pop("output_scores", False)
        self.repetition_penalty: float | None = kwargs.pop("repetition_penalty", None)
        self.bad_words_ids: list[list[int]] | None = kwargs.pop("bad_words_ids", None)
        self.suppress_tokens: list[int] | None = kwargs.pop("suppress_tokens", None)
        self.min_new_tokens: int | None = kwargs.pop("min_new_tokens", None)
        self.stop_strings: str | list[str] | None = kwargs.pop("stop_strings", None)
        for key in UNSUPPORTED_SETTINGS:
            setattr(self, key, kwargs.pop(key, None))
        for key in TOKEN_ID_KEYS:
            setattr(self, key, kwargs.pop(key, None))
        self._from_model_config: bool = kwargs.pop("_from_model_config", False)
        self._commit_hash: str | None = kwargs.pop("_commit_hash", None)
        self.transformers_version: str | None = kwargs.pop("transformers_version", None)
        # Released generation_config.json files may carry further keys (e.g. `generation_kwargs`): keep them.
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.validate()

    @classmethod
    def from_model_config(cls, model_config) -> "DimpleGenerationConfig":
        """Only the special-token ids carry over from a model config; decoding settings keep their defaults."""
        values = model_config if isinstance(model_config, dict) else model_config.to_dict()
        return cls(**{key: values.get(key) for key in TOKEN_ID_KEYS})

    def to_diff_dict(self) -> dict[str, Any]:
        """What differs from Dimple's defaults (the parent compares with autoregressive ones).

        A saved generation_config.json then omits e.g. `temperature=0`, which transformers' loader, reading the
        file as a plain `GenerationConfig` first, would flag as an invalid greedy setting. `do_sample` and
        `max_new_tokens` are always included: pipelines read this dict to decide which of their own defaults
        (sampling at temperature 0.7, 256 new tokens) to add, and Dimple's decoding must follow its own config.
        """
        defaults = DimpleGenerationConfig().to_dict()
        always = ("transformers_version", "do_sample", "max_new_tokens")
        return {
            key: value
            for key, value in self.to_dict().items()
            if key in always or key not in defaults or value != defaults[key]
        }

    def validate_standard_settings(self) -> None:
        """transformers' own generation settings: those diffusion decoding implements are checked, the others are
        accepted only at a value that changes nothing (see `UNSUPPORTED_SETTINGS`), so none is silently ignored."""
        for key, (neutral, why) in UNSUPPORTED_SETTINGS.items():
            value = getattr(self, key, None)
            if value is not None and value not in neutral:
                allowed = " or ".join(repr(v) for v in (None, *neutral))
                raise ValueError(
                    f"{key}={value!r} is not supported by Dimple's diffusion decoding: it belongs to {why}. "
                    f"Leave {key} at {allowed}."
                )
        penalty = self.repetition_penalty
        if penalty is not None and (
            isinstance(penalty, bool) or not isinstance(penalty, numbers.Real) or not 0 < penalty < math.inf
        ):
            raise ValueError(f"repetition_penalty must be a positive number (1.0 = off), got {penalty!r}.")
        min_new = self.min_new_tokens
        if min_new is not None and (not isinstance(min_new, int) or isinstance(min_new, bool) or min_new < 0):
            raise ValueError(f"min_new_tokens must be a non-negative integer, got {min_new!r}.")
        if self.suppress_tokens is not None and not is_id_list(self.suppress_tokens):
            raise ValueError(f"suppress_tokens must be a list of token ids, got {self.suppress_tokens!r}.")
        if self.bad_words_ids is not None:
            if not isinstance(self.bad_words_ids, (list, tuple)) or not all(
                is_id_list(words) for words in self.bad_words_ids
            ):
                raise ValueError(f"bad_words_ids must be a list of lists of token ids, got {self.bad_words_ids!r}.")
            longer = [list(words) for words in self.bad_words_ids if len(words) != 1]
            if longer:
                raise ValueError(
                    f"bad_words_ids {longer} have several tokens; diffusion decoding bans single tokens only (a "
                    "token sequence has no left-to-right prefix to block while the canvas is filled in parallel). "
                    "Pass one-token lists, or a response_template."
                )
        stops = self.stop_strings
        if stops is not None and not (
            isinstance(stops, str) or (isinstance(stops, (list, tuple)) and all(isinstance(s, str) and s for s in stops))
        ):
            raise ValueError(f"stop_strings must be a string or a list of non-empty strings, got {stops!r}.")

    def effective_temperature(self) -> float:
        """The sampling temperature decoding uses: as set, else the default sampling one with `do_sample=True`,
        else 0 (greedy). Dimple samples exactly when this is > 0 (the reference's convention: `temperature=0.2`
        alone samples)."""
        if self.temperature is not None:
            return self.temperature
        return DEFAULT_SAMPLING_TEMPERATURE if self.do_sample else 0.0

    @classmethod
    def from_loaded(cls, loaded: GenerationConfig) -> "DimpleGenerationConfig":
        """Convert what `from_pretrained` read from generation_config.json.

        A file written from a model config (`_from_model_config`, as the released one) carries no decoding
        intent, only token ids; anything else is taken as the author's decoding settings.
        """
        values = {key: value for key, value in loaded.to_diff_dict().items() if key != "transformers_version"}
        if values.get("_from_model_config"):
            values = {key: values[key] for key in TOKEN_ID_KEYS if key in values}
        return cls(**values)

    def validate(self, strict: bool = False, **kwargs) -> None:
        """Raise `ValueError` for any setting the decoder cannot honour, naming the fix."""
        if self.alg not in ALGORITHMS:
            raise ValueError(f"Unknown alg {self.alg!r}; choose one of {', '.join(ALGORITHMS)}.")
        if self.decoding_pipeline not in PIPELINES:
            raise ValueError(
                f"Unknown decoding_pipeline {self.decoding_pipeline!r}; choose one of {', '.join(PIPELINES)}."
            )
        if self.decoding_pipeline == "dream" and self.alg == "origin-ratio":
            raise ValueError("alg='origin-ratio' exists only in the 'dim' pipeline; use alg='origin' with 'dream'.")
        for name in ("temperature", "eps", "alg_temp", "top_p", "alg_p_threshold"):
            value = getattr(self, name)
            # NaN passes every range comparison below and would silently turn sampling into argmax.
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            ):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
        if self.alg_p_threshold is not None and not 0.0 <= self.alg_p_threshold <= 1.0:
            raise ValueError(
                f"alg_p_threshold must lie in [0, 1] (a probability), got {self.alg_p_threshold}; "
                "use None or 0 to disable confident decoding."
            )
        for name in ("steps", "max_new_tokens", "num_return_sequences", "block_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.steps is not None and self.steps > MAX_STEPS:
            raise ValueError(
                f"steps={self.steps} is more than any answer needs (each step is a forward pass; at most "
                f"{MAX_STEPS}); use at most max_new_tokens steps, i.e. one token per step."
            )
        if self.num_return_sequences > MAX_RETURN_SEQUENCES:
            raise ValueError(
                f"num_return_sequences={self.num_return_sequences} is above {MAX_RETURN_SEQUENCES} (each one is a "
                "batch row of every forward pass); ask for fewer, or call generate several times."
            )
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps must lie in (0, 1), got {self.eps}.")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if self.do_sample and self.temperature == 0:
            raise ValueError(
                "do_sample=True asks for sampling but temperature=0 is greedy; pass temperature > 0, or leave "
                f"temperature unset for the default sampling temperature {DEFAULT_SAMPLING_TEMPERATURE}."
            )
        self.validate_standard_settings()
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}.")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}.")
        if self.compile_config is not None and not isinstance(self.compile_config, CompileConfig):
            raise ValueError(
                f"compile_config must be a transformers.CompileConfig (or a dict of its fields), got "
                f"{type(self.compile_config).__name__}."
            )
        if self.alg_temp is not None and self.alg_temp < 0:
            raise ValueError(f"alg_temp must be >= 0 (None or 0 = take the most confident), got {self.alg_temp}.")


@dataclass
class DimpleGenerationOutput(ModelOutput):
    """Result of `generate(..., return_dict_in_generate=True)`.

    `sequences` holds prompt + answer canvas (the answer only when generate got `inputs_embeds` without
    `input_ids`); `history` one snapshot of it per step (with `output_history`); `scores` (with `output_scores`)
    one (batch, answer_len) float tensor per step: the confidence by which the committing rule ranked each
    masked position (token probability, margin or negative entropy, per `alg`; -inf where no mask waited);
    `num_forward_passes` the model calls made; `tokens_per_forward` per row, answer tokens committed per call.
    """

    sequences: torch.LongTensor | None = None
    history: tuple[torch.LongTensor, ...] | None = None
    scores: tuple[torch.FloatTensor, ...] | None = None
    num_forward_passes: int | None = None
    tokens_per_forward: torch.FloatTensor | None = None


# --- Unmasking policies: pure functions over flattened masked logits and (batch, answer) grids -------------


def propose_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    banned: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate token per masked position, plus the unfiltered and filtered distributions (K, V).

    Tokens are argmax (temperature 0) or sampled from the temperature/top-p/top-k filtered distribution;
    `banned` ids (mask, vision tokens) are never proposed, without altering either distribution.
    """
    original = logits.softmax(dim=-1)
    if temperature == 0 and top_p in (None, 1) and top_k is None:
        # Greedy without filters (the default): the filtered distribution is the original one.
        return original.masked_fill(banned, 0.0).max(dim=-1).indices, original, original
    scores = logits / temperature if temperature > 0 else logits
    if top_p is not None and top_p < 1:
        scores = TopPLogitsWarper(top_p, filter_value=torch.finfo(scores.dtype).min)(None, scores)
    if top_k is not None:
        scores = TopKLogitsWarper(top_k, filter_value=torch.finfo(scores.dtype).min)(None, scores)
    filtered = scores.softmax(dim=-1)
    weights = filtered.masked_fill(banned, 0.0)
    weights = torch.where(weights.sum(-1, keepdim=True) > 0, weights, original.masked_fill(banned, 0.0))
    if temperature > 0:
        tokens = torch.multinomial(weights, num_samples=1).squeeze(-1)
    else:
        tokens = weights.max(dim=-1).indices
    return tokens, original, filtered


def token_confidence(alg: str, probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Confidence per masked position: probability of the token, top-1 minus top-2, or negative entropy."""
    if alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if alg == "entropy":
        return (probs * torch.log(probs + 1e-10)).sum(dim=-1)
    return probs.gather(-1, tokens[:, None]).squeeze(-1)


def snapped_schedule(
    masks_left: torch.Tensor, masks_initial: torch.Tensor, step: int, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`dim` fallback: how many tokens each row commits now, and the grid value s that gave that count.

    The row's progress r = masks_left / masks_initial is snapped to the first grid point s ahead of both r and
    the current step for which floor(masks_left * (1 - s / r)) >= 1; the final grid point means "all".
    """
    steps = timesteps.numel() - 1
    ratio = masks_left / masks_initial.clamp(min=1)
    first_below = (timesteps[None, :] >= ratio[:, None]).sum(dim=1)
    start = first_below.clamp(min=step + 1)
    counts = (masks_left[:, None].float() * (1 - timesteps[None, :] / ratio[:, None])).nan_to_num(0.0).long()
    counts[:, -1] = masks_left
    index = torch.arange(steps + 1, device=timesteps.device)
    usable = (index[None, :] >= start[:, None]) & (counts >= 1)
    chosen = torch.where(usable.any(dim=1), usable.int().argmax(dim=1), steps)
    row_counts = counts.gather(1, chosen[:, None]).squeeze(1)
    return torch.where(masks_left > 0, row_counts, 0), timesteps[chosen]


def linear_schedule(masks_left: torch.Tensor, step: int, timesteps: torch.Tensor) -> torch.Tensor:
    """`dream` schedule: commit floor(masks_left * (1 - s / t)) at grid step t -> s, everything at the end."""
    if step == timesteps.numel() - 2:
        return masks_left
    t, s = timesteps[step], timesteps[step + 1]
    return (masks_left.float() * (1 - s / t)).long()


def select_most_confident(
    confidence: torch.Tensor, masked: torch.Tensor, counts: torch.Tensor, alg_temp: float | None
) -> torch.Tensor:
    """Per row, the `counts` masked positions of highest confidence, or sampled from softmax(conf / alg_temp)."""
    scores = confidence
    if alg_temp:
        logp = (confidence / alg_temp).masked_fill(~masked, float("-inf")).log_softmax(dim=-1)
        gumbel = -torch.log(-torch.log(torch.rand_like(logp).clamp(min=1e-20)))
        scores = logp + gumbel
    return rank_below(scores.masked_fill(~masked, float("-inf")), counts) & masked


def select_random(masked: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per row, `counts` masked positions uniformly at random (alg `origin`)."""
    return rank_below(torch.rand(masked.shape, device=masked.device).masked_fill(~masked, -1.0), counts) & masked


def select_leftmost(masked: torch.Tensor) -> torch.Tensor:
    """The first masked position of each row (alg `autoregressive`)."""
    first = torch.zeros_like(masked)
    first.scatter_(1, masked.int().argmax(dim=1, keepdim=True), True)
    return first & masked


def rank_below(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean grid: True where a position is among the `counts[row]` highest scores of its row."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    return ranks < counts[:, None]


def select_by_schedule(
    alg: str, confidence: torch.Tensor, masked: torch.Tensor, counts: torch.Tensor, alg_temp: float | None
) -> torch.Tensor:
    """Positions an algorithm commits once the schedule has fixed each row's count."""
    if alg == "autoregressive":
        return select_leftmost(masked)
    if alg == "origin":
        return select_random(masked, counts)
    return select_most_confident(confidence, masked, counts, alg_temp)


def dim_commit(
    config: DimpleGenerationConfig,
    step: int,
    steps: int,
    confidence: torch.Tensor,
    masked: torch.Tensor,
    masks_initial: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """Dimple's rule: per row, confident decoding first; rows where nothing passes use the snapped schedule."""
    masks_left = masked.sum(dim=1)
    counts, grid_value = snapped_schedule(masks_left, masks_initial, step, timesteps)
    if config.alg == "origin-ratio":
        ratio = masks_left / masks_initial.clamp(min=1)
        is_last = grid_value == timesteps[-1]
        probability = torch.where(is_last, torch.ones_like(ratio), 1 - grid_value / ratio)
        chosen = (torch.rand(masked.shape, device=masked.device) < probability[:, None]) & masked
    else:
        chosen = select_by_schedule(config.alg, confidence, masked, counts, config.alg_temp)
    if not config.alg_p_threshold:
        return chosen
    confident = masked if step == steps - 1 else masked & (confidence > config.alg_p_threshold)
    return torch.where(confident.any(dim=1, keepdim=True), confident, chosen)


def dream_commit(
    config: DimpleGenerationConfig,
    step: int,
    steps: int,
    confidence: torch.Tensor,
    masked: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """Dream's rule: a linear schedule over exactly `steps` iterations."""
    if config.alg == "autoregressive":
        return select_leftmost(masked)
    if config.alg == "origin":
        t, s = timesteps[step], timesteps[step + 1]
        probability = 1.0 if step == steps - 1 else 1 - s / t
        return (torch.rand(masked.shape, device=masked.device) < probability) & masked
    counts = linear_schedule(masked.sum(dim=1), step, timesteps)
    return select_most_confident(confidence, masked, counts, config.alg_temp)


def token_presence(sequences: torch.LongTensor, counted: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(batch, vocab) bool: which tokens each row holds at its `counted` positions."""
    index = torch.where(counted, sequences, vocab_size).clamp(max=vocab_size)
    present = torch.zeros(sequences.shape[0], vocab_size + 1, dtype=torch.bool, device=sequences.device)
    return present.scatter_(1, index, True)[:, :vocab_size]


def penalize_repetitions(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty (CTRL): logits of tokens already seen are divided by `penalty` when
    positive and multiplied by it when negative; applied to every masked position of the row."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def forbid_tokens(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Set `token_ids` to -inf in the selected rows (min_new_tokens: no stop token before position N)."""
    if token_ids.numel() == 0:
        return logits
    logits = logits.clone()
    logits[:, token_ids] = logits[:, token_ids].masked_fill(rows[:, None], float("-inf"))
    return logits


def end_at_stop_strings(
    answers: torch.LongTensor, stop_strings: list[str], tokenizer: Any, fill_id: int
) -> torch.LongTensor:
    """Per row, every token after the one that completes the first stop string becomes `fill_id` (EOS), so the
    answer ends there (decoders and `post_process_image_text_to_text` cut at it); the stop string is kept."""
    answers = answers.clone()
    for row in answers:
        ids = row.tolist()
        for end in range(1, len(ids) + 1):
            if any(stop in tokenizer.decode(ids[:end]) for stop in stop_strings):
                row[end:] = fill_id
                break
    return answers


def refuse_unsupported_arguments(kwargs: dict[str, Any]) -> None:
    """Pop transformers' generate() arguments diffusion decoding has no use for; refuse any that would act."""
    for name, why in UNSUPPORTED_GENERATE_ARGUMENTS.items():
        value = kwargs.pop(name, None)
        if value is None or value is False or (isinstance(value, (list, tuple)) and len(value) == 0):
            continue
        raise ValueError(f"generate({name}=...) is not supported by Dimple's diffusion decoding: it is {why}.")


def answer_lengths(answers: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """Per row, the number of answer tokens before the first stop token (EOS, `<|endoftext|>`)."""
    stops = torch.isin(answers, torch.tensor(stop_ids, device=answers.device))
    has_stop = stops.any(dim=1)
    return torch.where(has_stop, stops.int().argmax(dim=1), answers.shape[1])


class DimpleGenerationMixin(GenerationMixin):
    """`generate()` for Dimple: discrete-diffusion decoding (see the module docstring)."""

    generation_config_class = DimpleGenerationConfig

    def adjust_generation_fn(self, *args, **kwargs):
        """transformers loads generation_config.json as a plain `GenerationConfig`; make it ours."""
        super().adjust_generation_fn(*args, **kwargs)
        if not isinstance(self.generation_config, DimpleGenerationConfig):
            self.generation_config = DimpleGenerationConfig.from_loaded(self.generation_config)

    def diffusion_generate(self, inputs: torch.LongTensor | None = None, generation_config=None, **kwargs):
        """The reference implementation's entry point and keyword names; same as `generate`."""
        return self.generate(inputs, generation_config=generation_config, **kwargs)

    def resolve_generation_config(
        self, generation_config: GenerationConfig | None, kwargs: dict[str, Any]
    ) -> tuple[DimpleGenerationConfig, dict[str, Any]]:
        """Call kwargs > `generation_config` argument > `model.generation_config` > class defaults."""
        base = generation_config if generation_config is not None else self.generation_config
        if not isinstance(base, DimpleGenerationConfig):
            base = DimpleGenerationConfig.from_loaded(base)
        config = copy.deepcopy(base)
        model_inputs = config.update(**kwargs)
        for key in ("mask_token_id", "pad_token_id", "eos_token_id"):
            if getattr(config, key) is None:
                setattr(config, key, getattr(self.config, key))
        check_mask_token_id(config, self.config.vocab_size)
        config.temperature = config.effective_temperature()
        for flag in ("output_history", "output_scores"):
            if getattr(config, flag) and not config.return_dict_in_generate:
                raise ValueError(f"{flag}=True needs return_dict_in_generate=True (the result lives in the output).")
        return config, model_inputs

    def _prepare_generation_config(self, generation_config: GenerationConfig | None = None, *args, **kwargs):
        """What transformers' pipelines (up to 5.2x) call to merge their default generation config with the
        model's. Dimple's own config and the call's kwargs decide; the pipeline's defaults only fill settings
        neither sets, and its sampling defaults (temperature 0.7, ...) only when sampling was asked for, so a
        pipeline decodes as `generate()` would (greedy by default)."""
        config = copy.deepcopy(self.generation_config)
        model_inputs = config.update(**kwargs)
        chosen = set(self.generation_config.to_diff_dict()) | set(kwargs)
        defaults = generation_config.to_diff_dict() if generation_config is not None else {}
        for key, value in defaults.items():
            if key in chosen or key.startswith("_") or key == "transformers_version" or not hasattr(config, key):
                continue
            if key in PIPELINE_SAMPLING_SETTINGS and not config.do_sample:
                continue
            setattr(config, key, value)
        config.validate()
        return config, model_inputs

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config: GenerationConfig | None = None,
        streamer=None,
        **kwargs,
    ) -> torch.LongTensor | DimpleGenerationOutput:
        """Fill `max_new_tokens` mask slots after each prompt by discrete diffusion.

        Args:
            inputs / input_ids: left-padded prompts (batch, prompt_len); `attention_mask`, `pixel_values` and
                `image_grid_thw` as returned by the processor.
            inputs_embeds: prompt embeddings instead of (or with) `input_ids`; alone, the result holds the answer
                only. Images already merged into them need `input_ids` and `image_grid_thw` for their positions.
            generation_config: a `DimpleGenerationConfig` (or a transformers `GenerationConfig`); any of its fields
                can also be passed as keywords. transformers' settings Dimple does not implement are accepted only
                at their neutral values (`UNSUPPORTED_SETTINGS`).
            tokenizer: as in transformers; used to find `stop_strings`.
            streamer: transformers' `TextStreamer`/`TextIteratorStreamer` (final text, batch size 1); a streamer
                with `put_draft` (e.g. `TextDiffusionStreamer`) also receives the answer canvas after every step.
            response_template: structure prior, ids (answer_len,) or (batch, answer_len): `mask_token_id` marks
                the slots to fill, every other token is fixed. Sets the answer length.
            generation_tokens_hook_func(step, x, logits) -> x and generation_logits_hook_func(step, x, logits)
                -> logits: the reference's hooks (first tokens-hook call has step=None, logits=None).

        Returns:
            prompt + answer ids (batch, prompt_len + answer_len), or a `DimpleGenerationOutput` with
            `return_dict_in_generate=True`.
        """
        tokens_hook: Callable | None = kwargs.pop("generation_tokens_hook_func", None)
        logits_hook: Callable | None = checked_logits_hook(kwargs.pop("generation_logits_hook_func", None))
        template = kwargs.pop("response_template", None)
        tokenizer = kwargs.pop("tokenizer", None)
        refuse_unsupported_arguments(kwargs)
        length_given_as_total = "max_length" in kwargs and "max_new_tokens" not in kwargs
        config, model_inputs = self.resolve_generation_config(generation_config, kwargs)
        input_ids = inputs if inputs is not None else model_inputs.pop("input_ids", None)
        attention_mask = model_inputs.pop("attention_mask", None)
        pixel_values = model_inputs.pop("pixel_values", None)
        image_grid_thw = model_inputs.pop("image_grid_thw", None)
        inputs_embeds = model_inputs.pop("inputs_embeds", None)
        mm_token_type_ids = model_inputs.pop("mm_token_type_ids", None)
        if model_inputs:
            raise TypeError(
                f"generate() got unexpected keyword arguments {sorted(model_inputs)}. Positions are computed from "
                "input_ids; decoding settings are the fields of DimpleGenerationConfig."
            )
        if config.stop_strings is not None and tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer to read the answer: pass tokenizer=processor.tokenizer.")

        # With `inputs_embeds` alone the prompt's tokens are unknown: pad ids stand in for them (attended through
        # the attention mask, never output), and the result holds the answer only, as transformers returns it.
        prompt_known = input_ids is not None or inputs_embeds is None
        if not prompt_known:
            if tokens_hook is not None or logits_hook is not None:
                raise ValueError("The generation hooks see prompt tokens; with inputs_embeds, also pass input_ids.")
            input_ids = torch.full(inputs_embeds.shape[:2], config.pad_token_id, dtype=torch.long)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = self.validate_prompt(input_ids, attention_mask, config.mask_token_id)
        batch_size, prompt_len = input_ids.shape
        canvas = self.initial_canvas(config, template, batch_size, prompt_len, length_given_as_total)
        answer_len = canvas.shape[1]
        steps = config.steps or answer_len
        total_len = prompt_len + answer_len

        if inputs_embeds is not None:
            inputs_embeds = inputs_embeds.to(self.device, self.dtype)
        prompt_embeds, placeholder_ids = self.embed_inputs(
            input_ids if prompt_known else None, inputs_embeds, pixel_values, image_grid_thw, mm_token_type_ids,
            has_position_ids=False,
        )
        rope_prompt = input_ids if placeholder_ids is None else placeholder_ids
        sequences = torch.cat([input_ids, canvas], dim=1)
        full_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, answer_len)], dim=1)
        if tokens_hook is not None:
            sequences = checked_hook_tokens(tokens_hook(None, sequences, None), sequences, answer_len)
        rope_ids = torch.cat([rope_prompt, sequences[:, prompt_len:]], dim=1)
        position_ids, _ = self.get_rope_index(rope_ids, image_grid_thw, full_mask)

        repeats = config.num_return_sequences
        if repeats > 1:
            sequences, full_mask, prompt_embeds = (
                t.repeat_interleave(repeats, dim=0) for t in (sequences, full_mask, prompt_embeds)
            )
            position_ids = position_ids.repeat_interleave(repeats, dim=1)
        batch_size = sequences.shape[0]
        # Without padding no mask is passed at all, so SDPA is free to pick its flash kernel.
        attention = None if bool(full_mask.all()) else full_mask

        block_len = min(config.block_length or answer_len, answer_len)
        num_blocks = -(-answer_len // block_len)
        if num_blocks > 1 and (tokens_hook is not None or logits_hook is not None):
            raise ValueError(
                "generation_tokens_hook_func / generation_logits_hook_func follow the reference's single-block "
                "decoding; unset block_length (or make it >= max_new_tokens) to use them."
            )
        block_steps = steps if num_blocks == 1 else -(-steps // num_blocks)
        mask_id = config.mask_token_id
        banned = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=sequences.device)
        banned_ids = [mask_id] + [getattr(self.config, name) for name in VISION_TOKEN_KEYS]
        banned_ids += list(config.suppress_tokens or []) + [words[0] for words in config.bad_words_ids or []]
        banned[[i for i in banned_ids if i is not None and 0 <= i < self.config.vocab_size]] = True
        stop_ids = torch.tensor(
            [i for i in (config.eos_token_id, config.pad_token_id) if isinstance(i, int)], device=sequences.device
        )
        # Repetition penalty counts the real prompt tokens and the committed answer tokens, never padding or masks.
        known = full_mask.bool() if prompt_known else torch.arange(total_len, device=sequences.device) >= prompt_len
        timesteps = torch.linspace(1, config.eps, block_steps + 1, device=sequences.device)
        masks_at_start = (sequences[:, prompt_len:] == mask_id).sum(dim=1)
        cache = DimpleDiffusionCache(self.config.num_hidden_layers) if config.use_cache else None
        use_original = config.use_original_confidence and config.decoding_pipeline == "dim"
        want_full_logits = tokens_hook is not None or logits_hook is not None
        answer_index = torch.arange(answer_len, device=sequences.device)
        draft_streamer = streamer if hasattr(streamer, "put_draft") else None
        compiled_model = self.compiled_forward(config.compile_config) if config.compile_forward else None
        if streamer is not None:
            streamer.put(input_ids.cpu() if prompt_known else input_ids[:, :0].cpu())

        history, scores_per_step, forward_passes, unfinished = [], [], 0, 0
        nonfinite_steps = torch.zeros((), dtype=torch.long, device=sequences.device)  # read once, after the loop
        for block_start in range(0, answer_len, block_len):
            in_block = (answer_index >= block_start) & (answer_index < block_start + block_len)
            masks_initial = ((sequences[:, prompt_len:] == mask_id) & in_block).sum(dim=1)
            masks_left = int(masks_initial.sum())  # one host synchronisation per block ...
            if masks_left == 0:
                continue
            for step in range(block_steps):
                canvas = sequences[:, prompt_len:]
                masked = (canvas == mask_id) & in_block
                # (row, answer index) of every mask; its size is known on the host, so no synchronisation here.
                coords = torch.nonzero_static(masked, size=masks_left)
                rows, columns = coords[:, 0], coords[:, 1]
                if cache is None or step == 0:
                    start, end = 0, total_len
                else:
                    # Logits at position i predict token i + 1: the window starts one before the block.
                    start, end = prompt_len + block_start - 1, min(prompt_len + block_start + block_len, total_len)
                    cache.set_window(start)
                x = sequences[:, start:end]
                embeds = torch.cat(
                    [prompt_embeds[:, start:], self.get_input_embeddings()(sequences[:, max(start, prompt_len) : end])],
                    dim=1,
                )
                keep = torch.stack([rows, columns + (prompt_len - 1 - start)], dim=1)
                # Passes that fill the cache run eagerly, so its buffers live outside any graph at fixed addresses;
                # the compiled graph sees static shapes and keeps every logit row, gathered afterwards.
                compiled = compiled_model is not None and (cache is None or step > 0)
                gather_after = compiled and not want_full_logits
                logits = (compiled_model if compiled else self)(
                    inputs_embeds=embeds,
                    attention_mask=attention,
                    position_ids=position_ids[..., start:end],
                    cache=cache,
                    logits_to_keep=0 if want_full_logits or gather_after else keep,
                ).logits
                forward_passes += 1
                if gather_after:
                    logits = logits[keep[:, 0], keep[:, 1]]
                if want_full_logits:
                    logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
                    if logits_hook is not None:
                        logits = logits_hook(step, x, logits)
                    masked_logits = logits[:, -answer_len:][rows, columns]
                else:
                    masked_logits = logits

                nonfinite_steps += has_nonfinite_logits(masked_logits)
                if config.repetition_penalty not in (None, 1.0):
                    seen = token_presence(sequences, known & (sequences != mask_id), self.config.vocab_size)
                    masked_logits = penalize_repetitions(masked_logits, seen[rows], config.repetition_penalty)
                if config.min_new_tokens:
                    masked_logits = forbid_tokens(masked_logits, columns < config.min_new_tokens, stop_ids)
                tokens, original, filtered = propose_tokens(
                    masked_logits.float(), config.temperature, config.top_p, config.top_k, banned
                )
                scores = token_confidence(config.alg, original if use_original else filtered, tokens)
                confidence = torch.full(masked.shape, float("-inf"), device=masked.device)
                confidence = confidence.index_put((rows, columns), scores)
                if config.output_scores:
                    scores_per_step.append(confidence)
                proposal = canvas.index_put((rows, columns), tokens)
                if config.decoding_pipeline == "dim":
                    commit = dim_commit(config, step, block_steps, confidence, masked, masks_initial, timesteps)
                else:
                    commit = dream_commit(config, step, block_steps, confidence, masked, timesteps)
                new_canvas = torch.where(commit, proposal, canvas)
                if tokens_hook is not None:
                    updated = torch.cat([x[:, :-answer_len], new_canvas], dim=1)
                    updated = checked_hook_tokens(tokens_hook(step, updated, logits), updated, answer_len)
                    new_canvas = updated[:, -answer_len:]
                sequences[:, prompt_len:] = new_canvas
                if config.output_history:
                    history.append(sequences.clone())
                if draft_streamer is not None:
                    draft_streamer.put_draft(new_canvas.cpu())
                masks_left = int(((new_canvas == mask_id) & in_block).sum())  # ... and one per step
                if config.decoding_pipeline == "dim" and masks_left == 0:
                    break
            unfinished += masks_left

        warn_about_nonfinite_logits(int(nonfinite_steps), forward_passes)
        if unfinished:
            logger.warning(
                f"{unfinished} <|mask|> token(s) are still in the answer after {block_steps} step(s) per block "
                f"(alg={config.alg!r}, alg_p_threshold={config.alg_p_threshold}); raise `steps` or enable "
                "confident decoding to fill every slot."
            )
        if config.stop_strings is not None:
            stop_strings = [config.stop_strings] if isinstance(config.stop_strings, str) else config.stop_strings
            sequences[:, prompt_len:] = end_at_stop_strings(
                sequences[:, prompt_len:], stop_strings, tokenizer, config.pad_token_id
            )
        if streamer is not None:
            answers = sequences[:, prompt_len:]
            keep_len = int(answer_lengths(answers, stop_ids.tolist())[0]) if stop_ids.numel() else answer_len
            streamer.put(answers[:, :keep_len].cpu())
            streamer.end()
        shown = slice(None) if prompt_known else slice(prompt_len, None)
        if not config.return_dict_in_generate:
            return sequences[:, shown]
        committed = masks_at_start - (sequences[:, prompt_len:] == mask_id).sum(dim=1)
        return DimpleGenerationOutput(
            sequences=sequences[:, shown],
            history=tuple(snapshot[:, shown] for snapshot in history) if config.output_history else None,
            scores=tuple(scores_per_step) if config.output_scores else None,
            num_forward_passes=forward_passes,
            tokens_per_forward=committed.float() / max(forward_passes, 1),
        )

    def compiled_forward(self, compile_config: CompileConfig | None) -> Callable:
        """The model (hooks included) through `torch.compile`, built once per compile settings and then reused."""
        options = (compile_config or CompileConfig(mode="default")).to_dict()
        key = repr(sorted(options.items(), key=lambda item: item[0]))
        compiled = self.__dict__.setdefault("_compiled_forwards", {})
        if key not in compiled:
            compiled[key] = torch.compile(self, **options)
        return compiled[key]

    def validate_prompt(
        self, input_ids: torch.LongTensor | None, attention_mask: torch.Tensor | None, mask_token_id: int
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        """Check the prompt batch and move it to the model's device; generation needs left padding.

        Integer ids of another width are cast to int64; float or bool ids are refused, since a cast could
        silently change them. Without an attention mask, a pad token at either end of a row is refused: it would
        be read as prompt text.
        """
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(
                f"generate() needs `input_ids` as a torch.LongTensor, got {type(input_ids).__name__}; call the "
                "processor with return_tensors=\"pt\"."
            )
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(
                f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; pass the processor's "
                "input_ids (torch.long)."
            )
        if input_ids.ndim != 2:
            raise ValueError(
                f"generate() needs `input_ids` of shape (batch, prompt_len), got {tuple(input_ids.shape)}; add a "
                "batch dimension with input_ids[None]."
            )
        if input_ids.shape[1] == 0:
            raise ValueError("The prompt is empty; diffusion decoding needs at least one prompt token.")
        input_ids = input_ids.to(self.device, torch.long)
        check_token_ids(input_ids, self.config.vocab_size, "input_ids")
        pad_id = self.config.pad_token_id
        if attention_mask is None:
            edges = input_ids[:, [0, -1]]
            if pad_id is not None and input_ids.shape[1] > 1 and bool((edges == pad_id).any()):
                raise ValueError(
                    f"input_ids start or end with the pad token (id {pad_id}) but no attention_mask was given, so "
                    "padding would be read as prompt text; pass the attention_mask the processor returned (or a "
                    "mask of ones if those tokens are really part of the prompt)."
                )
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}."
            )
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token), as the processor returns it.")
        if not bool(attention_mask[:, -1].all()):
            raise ValueError(
                "The batch is right-padded; diffusion decoding appends the answer after the last column, so prompts "
                "must be left-padded (the processor pads on the left)."
            )
        if not bool((attention_mask[:, 1:] >= attention_mask[:, :-1]).all()):
            raise ValueError(
                "attention_mask has padding between prompt tokens; only left padding is supported (zeros before the "
                "first token of a row). Re-pad the batch with the processor."
            )
        if bool((input_ids == mask_token_id).any()):
            raise ValueError(
                f"The prompt contains the mask token (id {mask_token_id}); masks belong to the answer. Use "
                "`response_template` to give the answer a structure with slots to fill."
            )
        return input_ids, attention_mask

    def initial_canvas(
        self,
        config: DimpleGenerationConfig,
        template: torch.Tensor | None,
        batch_size: int,
        prompt_len: int,
        length_given_as_total: bool,
    ) -> torch.LongTensor:
        """The answer before decoding: all masks, or the structure-prior template.

        The length is checked against the model's positions before anything is allocated, so an absurd
        `max_new_tokens` fails fast instead of exhausting memory.
        """
        if template is None:
            answer_len = config.max_new_tokens
            if length_given_as_total:
                answer_len = config.max_length - prompt_len
                if answer_len < 1:
                    raise ValueError(
                        f"max_length ({config.max_length}) leaves no room after the {prompt_len}-token prompt; "
                        "set max_new_tokens instead."
                    )
            check_total_length(prompt_len, answer_len, self.config.max_position_embeddings)
            return torch.full((batch_size, answer_len), config.mask_token_id, dtype=torch.long, device=self.device)
        template = torch.as_tensor(template, device=self.device)
        if template.dtype != torch.long or template.ndim not in (1, 2) or template.shape[-1] == 0:
            raise ValueError("response_template must be token ids of shape (answer_len,) or (batch, answer_len).")
        template = template.expand(batch_size, -1) if template.ndim == 1 else template
        if template.shape[0] != batch_size:
            raise ValueError(f"response_template has {template.shape[0]} rows for a batch of {batch_size}.")
        check_total_length(prompt_len, template.shape[1], self.config.max_position_embeddings)
        check_token_ids(template, self.config.vocab_size, "response_template")
        vision_ids = [getattr(self.config, key) for key in VISION_TOKEN_KEYS]
        if bool(torch.isin(template, torch.tensor([i for i in vision_ids if i is not None], device=self.device)).any()):
            raise ValueError(
                "response_template contains vision tokens (image/video placeholders); a template fixes text only. "
                "Put images in the prompt."
            )
        return template.clone()


def is_id_list(values: Any) -> bool:
    """Whether `values` is a list/tuple of token ids (ints, not bools)."""
    return isinstance(values, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    )


def check_mask_token_id(config: "DimpleGenerationConfig", vocab_size: int) -> None:
    """The mask id fills the canvas and is banned as an answer: it must be a row of the vocabulary, and not EOS or
    padding (banning those would make every answer run to the full length)."""
    mask = config.mask_token_id
    if not isinstance(mask, int) or isinstance(mask, bool) or not 0 <= mask < vocab_size:
        raise ValueError(
            f"mask_token_id must be a token id inside the vocabulary [0, {vocab_size}), got {mask!r}; use the "
            "tokenizer's <|mask|> id (model.config.mask_token_id)."
        )
    for key in ("pad_token_id", "eos_token_id"):
        value = getattr(config, key)
        if mask == value or (isinstance(value, (list, tuple)) and mask in value):
            raise ValueError(
                f"mask_token_id ({mask}) equals {key}; the mask token needs its own id. Use the tokenizer's "
                "<|mask|> id (model.config.mask_token_id)."
            )


def has_nonfinite_logits(logits: torch.Tensor) -> torch.Tensor:
    """0-d tensor: whether any row holds NaN or +inf, computed on the device (no host synchronisation).

    A row's float32 sum is NaN or +inf exactly then; -inf (tokens banned by a logits hook) keeps it at -inf."""
    sums = logits.sum(dim=-1, dtype=torch.float32)
    return (sums.isnan() | (sums == float("inf"))).any()


def warn_about_nonfinite_logits(bad_steps: int, forward_passes: int) -> None:
    """NaN/inf logits make confidences meaningless and the answer garbage; a warning (not an error) because the
    other rows of a batch may be fine and the output is still returned for inspection."""
    if bad_steps:
        logger.warning(
            f"The logits held NaN or inf at {bad_steps} of {forward_passes} step(s), so the answer is meaningless. "
            "Check the weights (load with strict=True, the default, to refuse non-finite weights) and the dtype: "
            "float16 can overflow where bfloat16 or float32 do not."
        )


def check_total_length(prompt_len: int, answer_len: int, max_positions: int) -> None:
    """Prompt and answer share the model's rotary positions."""
    if prompt_len + answer_len > max_positions:
        raise ValueError(
            f"Prompt ({prompt_len}) + answer ({answer_len}) tokens exceed the model's max_position_embeddings "
            f"({max_positions}); shorten the prompt or the answer."
        )


def check_token_ids(ids: torch.Tensor, vocab_size: int, name: str) -> None:
    """Out-of-vocabulary ids would fail deep in the embedding with a bare IndexError (or silently on some GPUs)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"{name} holds ids outside the model's vocabulary [0, {vocab_size}) (min {int(ids.min())}, max "
            f"{int(ids.max())}); encode the text with this checkpoint's own processor/tokenizer."
        )


def checked_logits_hook(hook: Callable | None) -> Callable | None:
    """Wrap a logits hook so that a result of the wrong shape or type fails at once instead of shifting logits."""
    if hook is None:
        return None

    def checked(step: int, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        result = hook(step, x, logits)
        if not isinstance(result, torch.Tensor) or result.shape != logits.shape:
            raise ValueError(
                f"generation_logits_hook_func must return logits of shape {tuple(logits.shape)}, got "
                f"{getattr(result, 'shape', type(result))}; return the (modified) logits it was given."
            )
        return result

    return checked


def checked_hook_tokens(result: torch.Tensor, before: torch.Tensor, answer_len: int) -> torch.Tensor:
    """A tokens hook may rewrite the answer but must keep the shape and leave the prompt alone."""
    if not isinstance(result, torch.Tensor) or result.shape != before.shape:
        raise ValueError(
            f"generation_tokens_hook_func must return a tensor of shape {tuple(before.shape)}, got "
            f"{getattr(result, 'shape', type(result))}."
        )
    if not torch.equal(result[:, :-answer_len], before[:, :-answer_len]):
        raise ValueError("generation_tokens_hook_func changed prompt tokens; it may only change answer positions.")
    return result
