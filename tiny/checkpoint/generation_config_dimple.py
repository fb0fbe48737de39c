"""`DimpleGenerationConfig`: the settings of diffusion decoding, and the rule for transformers' other settings.

Every transformers generation setting is either implemented by Dimple's decoder (and validated here) or listed in
`UNSUPPORTED_SETTINGS` with the values at which it changes nothing; any other value is refused with the reason, so
no setting is ever accepted and silently ignored. The same holds for `generate()` arguments
(`UNSUPPORTED_GENERATE_ARGUMENTS`).
"""

import math
import numbers
from typing import Any

from transformers import CompileConfig, GenerationConfig

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
# The answer length when neither `max_new_tokens` nor `max_length` is set.
DEFAULT_MAX_NEW_TOKENS = 64
# Position rules whose order is random even when tokens are greedy: their answers differ between runs.
RANDOM_ORDER_ALGORITHMS = ("origin", "origin-ratio")
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

class DimpleGenerationConfig(GenerationConfig):
    """Settings of diffusion decoding.

    Defaults give the paper's fast path, deterministically: confident decoding (commit every masked position
    whose confidence exceeds `alg_p_threshold` = 0.95, else the most confident ones by the timestep schedule,
    `alg="maskgit_plus"`), greedy tokens (`temperature=0`) and the prefix cache (`use_cache=True`).

    Args:
        max_new_tokens: answer length, i.e. number of mask slots (default 64). `max_length` (prompt + answer)
            is honoured when given without it (or with `max_new_tokens=None`), as in transformers.
        steps: maximum number of forward passes in total (default: the answer length, one token per step at
            worst); with `block_length` they are split over the blocks in proportion to their sizes.
        eps: last value of the timestep grid `linspace(1, eps, steps + 1)`.
        alg: how positions are chosen: one of `ALGORITHMS`.
        alg_temp: > 0 samples positions from softmax(confidence / alg_temp) instead of taking the top ones.
        alg_p_threshold: confident-decoding threshold in [0, 1] (`dim` pipeline); None or 0 disables it. Where it
            cannot act (`dream` pipeline, `alg="entropy"`) the default is dropped and an explicit value refused.
        use_original_confidence: confidences from the unfiltered softmax (`dim` pipeline).
        decoding_pipeline: `"dim"` (Dimple's: threshold + snapped schedule, stops when done) or `"dream"`
            (Dream's: exactly `steps` iterations, linear schedule).
        temperature, top_p, top_k: token sampling (temperature 0 = argmax; top_k 0 = off, as in transformers).
        do_sample: None (unset) samples exactly when `temperature` > 0 (the reference's convention); True samples
            (at temperature 1.0 unless one is set); False is greedy whatever the temperature.
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
        # The settings given, then every one assigned later (`__setattr__`): what a passed config sets (see
        # `chosen_settings`), even where the value equals Dimple's default.
        object.__setattr__(self, "_chosen", {key for key in kwargs if is_setting(key)})
        object.__setattr__(self, "_tracking", False)
        # Like transformers' DiffusionGemma config, the autoregressive fields of the parent are not wanted here.
        # A total length given alone is the length rule, as in transformers (max_new_tokens wins when both are set).
        default_new_tokens = None if kwargs.get("max_length") is not None else DEFAULT_MAX_NEW_TOKENS
        self.max_new_tokens: int | None = kwargs.pop("max_new_tokens", default_new_tokens)
        self.max_length: int | None = kwargs.pop("max_length", None)
        self.steps: int | None = kwargs.pop("steps", None)
        self.eps: float = kwargs.pop("eps", 1e-3)
        self.alg: str = kwargs.pop("alg", "maskgit_plus")
        self.alg_temp: float | None = kwargs.pop("alg_temp", None)
        threshold_given = "alg_p_threshold" in kwargs
        self.alg_p_threshold: float | None = kwargs.pop("alg_p_threshold", 0.95)
        self.use_original_confidence: bool = kwargs.pop("use_original_confidence", True)
        self.decoding_pipeline: str = kwargs.pop("decoding_pipeline", "dim")
        self.temperature: float | None = kwargs.pop("temperature", None)
        self.do_sample: bool | None = kwargs.pop("do_sample", None)
        self.top_p: float | None = kwargs.pop("top_p", None)
        self.top_k: int | None = kwargs.pop("top_k", None)
        self.use_cache: bool = kwargs.pop("use_cache", True)
        self.block_length: int | None = kwargs.pop("block_length", None)
        self.compile_forward: bool = kwargs.pop("compile_forward", False)
        compile_config = kwargs.pop("compile_config", None)
        self.compile_config = as_compile_config(compile_config)
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
        self.settle_threshold(explicit=threshold_given)
        self.validate()
        self._tracking = True

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if self.__dict__.get("_tracking") and is_setting(name):
            self._chosen.add(name)

    def to_dict(self) -> dict[str, Any]:
        """transformers' `to_dict` without the record of chosen settings (bookkeeping, not a setting)."""
        output = super().to_dict()
        for key in ("_chosen", "_tracking"):
            output.pop(key, None)
        return output

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

    def _check_standard_settings(self) -> None:
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
        listed = isinstance(stops, (list, tuple)) and all(isinstance(stop, str) and stop for stop in stops)
        if stops is not None and not ((isinstance(stops, str) and stops) or listed):
            raise ValueError(f"stop_strings must be a string or a list of non-empty strings, got {stops!r}.")

    def effective_temperature(self) -> float:
        """The sampling temperature decoding uses: 0 (greedy) with an explicit `do_sample=False`, else as set, else
        the default sampling one with `do_sample=True`, else 0. Dimple samples exactly when this is > 0 (the
        reference's convention: `temperature=0.2` alone samples)."""
        if self.do_sample is False:
            return 0.0
        if self.temperature is not None:
            return self.temperature
        return DEFAULT_SAMPLING_TEMPERATURE if self.do_sample else 0.0

    def is_deterministic(self) -> bool:
        """Whether every run gives the same answer: greedy tokens and a position rule without randomness."""
        return self.effective_temperature() == 0 and self.alg not in RANDOM_ORDER_ALGORITHMS and not self.alg_temp

    def threshold_without_effect(self) -> str | None:
        """Why `alg_p_threshold` cannot change the answer under these settings, or None when it can."""
        if self.decoding_pipeline == "dream":
            return "the 'dream' pipeline follows its linear schedule and has no confident decoding (use 'dim')"
        if self.alg == "entropy":
            return "alg='entropy' ranks by negative entropy (<= 0), which never exceeds a positive threshold"
        return None

    def settle_threshold(self, explicit: bool) -> None:
        """Drop a threshold that cannot act when it is the default; refuse it, naming why, when it was chosen."""
        reason = self.threshold_without_effect()
        if not self.alg_p_threshold or reason is None or isinstance(self.alg_p_threshold, bool):
            return
        if explicit:
            raise ValueError(
                f"alg_p_threshold={self.alg_p_threshold} has no effect here: {reason}. Leave alg_p_threshold unset "
                "(or None) with these settings."
            )
        self.alg_p_threshold = None

    def update(self, **kwargs) -> dict[str, Any]:
        """transformers' `update`, taking `compile_config` as a dict of `CompileConfig` fields too."""
        if isinstance(kwargs.get("compile_config"), dict):
            kwargs = {**kwargs, "compile_config": as_compile_config(kwargs["compile_config"])}
        return super().update(**kwargs)

    def chosen_settings(self) -> dict[str, Any]:
        """The settings this config sets: those given to it (at construction or assigned later) and those that
        differ from Dimple's defaults. The others are unset, as None is in a transformers `GenerationConfig`."""
        chosen = self.__dict__.get("_chosen", set())
        values = self.to_dict()
        return {**set_fields(self, DimpleGenerationConfig().to_dict()), **{key: values[key] for key in chosen}}

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
        for name in ("steps", "max_new_tokens", "max_length", "num_return_sequences", "block_length"):
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
        check_eps(self.eps)
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if self.do_sample and self.temperature == 0:
            raise ValueError(
                "do_sample=True asks for sampling but temperature=0 is greedy; pass temperature > 0, or leave "
                f"temperature unset for the default sampling temperature {DEFAULT_SAMPLING_TEMPERATURE}."
            )
        self._check_standard_settings()
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}.")
        top_k = self.top_k
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}.")
        if self.compile_config is not None and not isinstance(self.compile_config, CompileConfig):
            raise ValueError(
                f"compile_config must be a transformers.CompileConfig (or a dict of its fields), got "
                f"{type(self.compile_config).__name__}."
            )
        if self.alg_temp is not None and self.alg_temp < 0:
            raise ValueError(f"alg_temp must be >= 0 (None or 0 = take the most confident), got {self.alg_temp}.")


def is_setting(name: str) -> bool:
    """Whether an attribute of a generation config is a setting (not metadata or bookkeeping)."""
    return not name.startswith("_") and name != "transformers_version"


def set_fields(config: GenerationConfig, defaults: dict[str, Any]) -> dict[str, Any]:
    """The public fields of `config` whose values differ from `defaults`."""
    return {
        key: value
        for key, value in config.to_dict().items()
        if is_setting(key) and (key not in defaults or value != defaults[key])
    }


def given_settings(config: GenerationConfig) -> dict[str, Any]:
    """What a `generation_config` passed to `generate()` sets: a transformers `GenerationConfig`'s fields that are
    not None (transformers' own meaning of unset), a Dimple one's `chosen_settings`."""
    if isinstance(config, DimpleGenerationConfig):
        return config.chosen_settings()
    if not isinstance(config, GenerationConfig):
        raise TypeError(
            f"generation_config must be a GenerationConfig (or DimpleGenerationConfig), got {type(config).__name__}."
        )
    return {key: value for key, value in set_fields(config, GenerationConfig().to_dict()).items() if value is not None}


def with_length_rule(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` where a `max_length` given without `max_new_tokens` clears the latter, so the total decides."""
    if settings.get("max_length") is not None and "max_new_tokens" not in settings:
        return {**settings, "max_new_tokens": None}
    return settings


def as_compile_config(value: Any) -> Any:
    """A dict of `CompileConfig` fields as a `CompileConfig`; anything else unchanged (validate checks it)."""
    return CompileConfig(**value) if isinstance(value, dict) else value


def refuse_unsupported_arguments(kwargs: dict[str, Any]) -> None:
    """Pop transformers' generate() arguments diffusion decoding has no use for; refuse any that would act."""
    for name, why in UNSUPPORTED_GENERATE_ARGUMENTS.items():
        value = kwargs.pop(name, None)
        if value is None or value is False or (isinstance(value, (list, tuple)) and len(value) == 0):
            continue
        raise ValueError(f"generate({name}=...) is not supported by Dimple's diffusion decoding: it is {why}.")


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


def check_eps(eps: float) -> None:
    """`eps` bounds the masking ratio (training) and ends the timestep grid (decoding): it must lie in (0, 1)."""
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1), got {eps}.")
