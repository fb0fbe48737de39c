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
TOKEN_ID_KEYS = ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id")
VISION_TOKEN_KEYS = (
    "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "vision_token_id"
)

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
        self.temperature: float = kwargs.pop("temperature", 0.0)
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
        file as a plain `GenerationConfig` first, would flag as an invalid greedy setting.
        """
        defaults = DimpleGenerationConfig().to_dict()
        return {
            key: value
            for key, value in self.to_dict().items()
            if key == "transformers_version" or key not in defaults or value != defaults[key]
        }

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
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps must lie in (0, 1), got {self.eps}.")
        if self.temperature is None or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if self.do_sample and self.temperature == 0:
            raise ValueError("do_sample=True needs temperature > 0 (Dimple samples exactly when temperature > 0).")
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

    `sequences` holds prompt + answer canvas; `history` one snapshot of it per step (with `output_history`);
    `num_forward_passes` the model calls made; `tokens_per_forward` per row, answer tokens committed per call.
    """

    sequences: torch.LongTensor | None = None
    history: tuple[torch.LongTensor, ...] | None = None
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
        if config.output_history and not config.return_dict_in_generate:
            raise ValueError(
                "output_history=True needs return_dict_in_generate=True (the history lives in the output)."
            )
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
            generation_config: a `DimpleGenerationConfig`; any of its fields can also be passed as keywords.
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
        length_given_as_total = "max_length" in kwargs and "max_new_tokens" not in kwargs
        config, model_inputs = self.resolve_generation_config(generation_config, kwargs)
        input_ids = inputs if inputs is not None else model_inputs.pop("input_ids", None)
        attention_mask = model_inputs.pop("attention_mask", None)
        pixel_values = model_inputs.pop("pixel_values", None)
        image_grid_thw = model_inputs.pop("image_grid_thw", None)
        model_inputs.pop("mm_token_type_ids", None)
        if model_inputs:
            raise TypeError(
                f"generate() got unexpected keyword arguments {sorted(model_inputs)}. Positions and embeddings are "
                "computed from input_ids; decoding settings are the fields of DimpleGenerationConfig."
            )

        input_ids, attention_mask = self.validate_prompt(input_ids, attention_mask, config.mask_token_id)
        batch_size, prompt_len = input_ids.shape
        canvas = self.initial_canvas(config, template, batch_size, prompt_len, length_given_as_total)
        answer_len = canvas.shape[1]
        steps = config.steps or answer_len
        total_len = prompt_len + answer_len

        self.validate_image_inputs(input_ids, pixel_values, image_grid_thw)
        prompt_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            features = self.get_image_features(pixel_values, image_grid_thw)
            prompt_embeds = self.merge_image_features(input_ids, prompt_embeds, features)
        sequences = torch.cat([input_ids, canvas], dim=1)
        full_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, answer_len)], dim=1)
        if tokens_hook is not None:
            sequences = checked_hook_tokens(tokens_hook(None, sequences, None), sequences, answer_len)
        position_ids, _ = self.get_rope_index(sequences, image_grid_thw, full_mask)

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
        banned[[i for i in banned_ids if i is not None and 0 <= i < self.config.vocab_size]] = True
        timesteps = torch.linspace(1, config.eps, block_steps + 1, device=sequences.device)
        masks_at_start = (sequences[:, prompt_len:] == mask_id).sum(dim=1)
        cache = DimpleDiffusionCache(self.config.num_hidden_layers) if config.use_cache else None
        use_original = config.use_original_confidence and config.decoding_pipeline == "dim"
        want_full_logits = tokens_hook is not None or logits_hook is not None
        answer_index = torch.arange(answer_len, device=sequences.device)
        draft_streamer = streamer if hasattr(streamer, "put_draft") else None
        compiled_model = self.compiled_forward(config.compile_config) if config.compile_forward else None
        if streamer is not None:
            streamer.put(input_ids.cpu())

        history, forward_passes, unfinished = [], 0, 0
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

                tokens, original, filtered = propose_tokens(
                    masked_logits.float(), config.temperature, config.top_p, config.top_k, banned
                )
                scores = token_confidence(config.alg, original if use_original else filtered, tokens)
                confidence = torch.full(masked.shape, float("-inf"), device=masked.device)
                confidence = confidence.index_put((rows, columns), scores)
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

        if unfinished:
            logger.warning(
                f"{unfinished} <|mask|> token(s) are still in the answer after {block_steps} step(s) per block "
                f"(alg={config.alg!r}, alg_p_threshold={config.alg_p_threshold}); raise `steps` or enable "
                "confident decoding to fill every slot."
            )
        if streamer is not None:
            answers = sequences[:, prompt_len:]
            stops = [i for i in (config.eos_token_id, config.pad_token_id) if isinstance(i, int)]
            keep_len = int(answer_lengths(answers, stops)[0]) if stops else answer_len
            streamer.put(answers[:, :keep_len].cpu())
            streamer.end()
        if not config.return_dict_in_generate:
            return sequences
        committed = masks_at_start - (sequences[:, prompt_len:] == mask_id).sum(dim=1)
        return DimpleGenerationOutput(
            sequences=sequences,
            history=tuple(history) if config.output_history else None,
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
