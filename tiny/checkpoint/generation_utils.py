"""Discrete-diffusion decoding for Dimple: `generate()` fills a canvas of `<|mask|>` tokens over a few passes.

`DimpleGenerationMixin.generate` runs five phases; the same numbers mark them in its body and in the docstrings of
the private methods that implement them:
1. resolve: merge the call's settings into the generation config and split off the model inputs;
2. prepare: check the prompt, append the mask canvas (or a structure-prior template), embed the prompt once with
   its images merged, and place prompt + canvas on the M-RoPE positions;
3. forward: each step runs one pass (the whole sequence, or with `use_cache` the step's window against the cached
   keys/values) and the LM head only where a mask waits for a token;
4. commit: propose a token for every masked position and commit, per row, those the pipeline's rule picks
   (confident decoding, else a schedule); steps repeat per block until no mask is left or the steps are spent;
5. finish: report, apply stop strings, return the sequences and decoding statistics.

The settings live in `generation_config_dimple`, the unmasking rules (pure functions) in `sampling_dimple`, and the
checks of the inputs in `generation_inputs_dimple`; this module is only the driver.
"""

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import CompileConfig, GenerationConfig, GenerationMixin
from transformers.utils import ModelOutput, logging

from .cache_dimple import DimpleDiffusionCache
from .generation_config_dimple import (
    PIPELINE_SAMPLING_SETTINGS,
    VISION_TOKEN_KEYS,
    DimpleGenerationConfig,
    check_mask_token_id,
    given_settings,
    refuse_unsupported_arguments,
    with_length_rule,
)
from .generation_inputs_dimple import check_prompt, checked_hook_tokens, checked_logits_hook, initial_canvas
from .sampling_dimple import (
    answer_lengths,
    dimple_commit_mask,
    dream_commit_mask,
    end_at_stop_strings,
    forbid_tokens,
    has_nonfinite_logits,
    penalize_repetitions,
    propose_tokens,
    split_steps,
    stop_token_ids,
    token_confidence,
    token_presence,
)

logger = logging.get_logger(__name__)

# What `generate()` takes besides settings: the prompt batch as the processor returns it.
MODEL_INPUT_NAMES = ("attention_mask", "pixel_values", "image_grid_thw", "inputs_embeds", "mm_token_type_ids")


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


@dataclass
class _GenerateRequest:
    """Phase 1's result: the resolved settings, the prompt batch and the extras of one `generate()` call."""

    config: DimpleGenerationConfig
    input_ids: torch.LongTensor | None
    inputs: dict[str, Any]
    template: torch.Tensor | None
    tokenizer: Any
    tokens_hook: Callable | None
    logits_hook: Callable | None


@dataclass
class _DecodingPlan:
    """Phase 2's result: everything fixed before the first forward pass. Steps read it and write `sequences` only."""

    config: DimpleGenerationConfig
    sequences: torch.LongTensor  # (batch, prompt_len + answer_len): prompt ids, then the canvas
    prompt_len: int
    prompt_known: bool  # False when the prompt came as `inputs_embeds` only: pad ids stand in for its tokens
    prompt_embeds: torch.Tensor
    position_ids: torch.LongTensor
    attention_mask: torch.Tensor | None  # None without padding, so SDPA is free to pick its flash kernel
    counted: torch.Tensor  # positions whose tokens count for `repetition_penalty` (real prompt tokens, answer)
    banned: torch.Tensor  # (vocab,) bool: never proposed (mask, vision tokens, suppressed and bad words)
    stop_ids: torch.Tensor
    answer_masks_at_start: torch.Tensor
    fixed: torch.Tensor  # (batch, answer_len) bool: a structure prior's fixed tokens, never changed
    block_len: int
    steps_per_block: list[int]  # the `steps` budget split over the blocks
    block_steps: int  # the active block's steps and timestep grid, set as each block starts
    timesteps: torch.Tensor
    tokens_hook: Callable | None
    logits_hook: Callable | None
    cache: DimpleDiffusionCache | None
    compiled_forward: Callable | None

    @property
    def answer_len(self) -> int:
        return self.sequences.shape[1] - self.prompt_len

    @property
    def canvas(self) -> torch.LongTensor:
        return self.sequences[:, self.prompt_len :]

    @property
    def hooked(self) -> bool:
        return self.tokens_hook is not None or self.logits_hook is not None

    def enter_block(self, block_start: int) -> None:
        """Make the block that starts at answer index `block_start` the active one: its share of `steps` and its
        timestep grid (the same for `generate()` and for a caller-driven `DiffusionDecoding`)."""
        self.block_steps = self.steps_per_block[block_start // self.block_len]
        self.timesteps = torch.linspace(1, self.config.eps, self.block_steps + 1, device=self.sequences.device)


@dataclass
class _DecodingRecord:
    """What the steps report: counts for the output and the warnings, and the optional per-step outputs."""

    nonfinite_steps: torch.Tensor  # 0-d count on the device, read once after the last step
    forward_passes: int = 0
    unfinished: int = 0
    history: list[torch.LongTensor] = field(default_factory=list)
    scores: list[torch.FloatTensor] = field(default_factory=list)


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
        """Fill `max_new_tokens` mask slots after each prompt by discrete diffusion (phases 1-5, module docstring).

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
        # 1. Resolve the settings and split off the model inputs.
        request = self._resolve_request(inputs, generation_config, kwargs)
        if streamer is not None:
            check_streamed_request(request)
        # 2. Check the prompt, build the canvas, embed the prompt once, place every position.
        plan = self._prepare_decoding(request)
        if streamer is not None:
            prompt = plan.sequences[:: plan.config.num_return_sequences, : plan.prompt_len]
            streamer.put(prompt.cpu() if plan.prompt_known else prompt[:, :0].cpu())
        # 3-4. Block by block (one block unless `block_length`), forward and commit until no mask is left.
        record = _DecodingRecord(nonfinite_steps=torch.zeros((), dtype=torch.long, device=plan.sequences.device))
        draft_streamer = streamer if hasattr(streamer, "put_draft") else None
        for block_start in range(0, plan.answer_len, plan.block_len):
            plan.enter_block(block_start)
            self._decode_block(plan, block_start, record, draft_streamer)
        # 5. Report, apply stop strings, stream the final text, shape the output.
        return self._finish(plan, record, request.tokenizer, streamer)

    def start_decoding(
        self, inputs: torch.LongTensor | None = None, generation_config: GenerationConfig | None = None,
        streamer=None, **kwargs,
    ) -> "DiffusionDecoding":
        """The public seam for schedulers that run the forward passes themselves (`dimple.engine` batches many
        requests into one pass per step): phases 1-2 of `generate()` for one request, returned as a
        `DiffusionDecoding` whose steps the caller drives. Takes what `generate()` takes, for a batch of one
        prompt; refuses what needs `generate()`'s own forward (the reference's hooks, `compile_forward`,
        `num_return_sequences` > 1). Driven to the end with this model's forward and a `DimpleDiffusionCache`,
        it decodes exactly as `generate()` does."""
        request = self._resolve_request(inputs, generation_config, kwargs)
        if request.tokens_hook is not None or request.logits_hook is not None:
            raise ValueError("generation_tokens_hook_func / generation_logits_hook_func need generate() itself.")
        if request.config.compile_forward or request.config.num_return_sequences != 1:
            raise ValueError(
                "compile_forward and num_return_sequences > 1 need generate() itself; a scheduler runs the "
                "forward pass and decodes one answer per request."
            )
        plan = self._prepare_decoding(request)
        if plan.sequences.shape[0] != 1:
            raise ValueError(f"start_decoding takes one prompt, got a batch of {plan.sequences.shape[0]}.")
        return DiffusionDecoding(self, plan, request.tokenizer, streamer)

    def generate_batch(
        self, inputs: list, generation_config: GenerationConfig | None = None, progress_bar: bool = True, **kwargs
    ) -> list[torch.LongTensor]:
        """transformers' continuous-batching entry point (which decodes autoregressively) for diffusion: every
        request in `inputs` (processor outputs, one prompt each) is decoded by `dimple.engine`, many per forward
        pass, and the answers (1-D ids after the prompt) come back in input order. Needs the `dimple` package."""
        try:
            from dimple.engine import generate_batch
        except ImportError as error:
            raise ImportError(
                "generate_batch runs the batching engine of the dimple package: pip install dimple (the remote "
                "code alone decodes with generate())."
            ) from error
        return generate_batch(self, inputs, generation_config=generation_config, progress_bar=progress_bar, **kwargs)

    def _resolve_generation_config(
        self, generation_config: GenerationConfig | None, kwargs: dict[str, Any]
    ) -> tuple[DimpleGenerationConfig, dict[str, Any]]:
        """1. Call kwargs > `generation_config` argument > `model.generation_config` > class defaults; returns the
        config and the kwargs that are not settings (the model inputs).

        As in transformers' `_prepare_generation_config`, a passed config overrides the model's only where it sets
        a field (not None; for a `DimpleGenerationConfig`, not at Dimple's default), so its gaps are the model's."""
        config = copy.deepcopy(self.generation_config)
        if not isinstance(config, DimpleGenerationConfig):
            config = DimpleGenerationConfig.from_loaded(config)
        given = with_length_rule(given_settings(generation_config)) if generation_config is not None else {}
        config.update(**given, allow_custom_entries=True)
        model_inputs = config.update(**with_length_rule(kwargs))
        for key in ("mask_token_id", "pad_token_id", "eos_token_id"):
            if getattr(config, key) is None:
                setattr(config, key, getattr(self.config, key))
        check_mask_token_id(config, self.config.vocab_size)
        config.settle_threshold(explicit="alg_p_threshold" in given or "alg_p_threshold" in kwargs)
        check_decoding_choice(config)
        config.temperature = config.effective_temperature()
        config.top_k = config.top_k or None  # 0 is transformers' "no top-k filter"
        return config, model_inputs

    def _resolve_request(
        self, inputs: torch.LongTensor | None, generation_config: GenerationConfig | None, kwargs: dict[str, Any]
    ) -> _GenerateRequest:
        """1. Split one call's keywords into the generate-only extras, the settings and the model inputs."""
        tokens_hook = kwargs.pop("generation_tokens_hook_func", None)
        logits_hook = checked_logits_hook(kwargs.pop("generation_logits_hook_func", None))
        template = kwargs.pop("response_template", None)
        tokenizer = kwargs.pop("tokenizer", None)
        refuse_unsupported_arguments(kwargs)
        config, model_inputs = self._resolve_generation_config(generation_config, kwargs)
        input_ids = inputs if inputs is not None else model_inputs.pop("input_ids", None)
        prompt = {name: model_inputs.pop(name, None) for name in MODEL_INPUT_NAMES}
        if model_inputs:
            raise TypeError(
                f"generate() got unexpected keyword arguments {sorted(model_inputs)}. Positions are computed from "
                "input_ids; decoding settings are the fields of DimpleGenerationConfig."
            )
        if config.stop_strings is not None and tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer to read the answer: pass tokenizer=processor.tokenizer.")
        return _GenerateRequest(config, input_ids, prompt, template, tokenizer, tokens_hook, logits_hook)

    def _prepare_decoding(self, request: _GenerateRequest) -> _DecodingPlan:
        """2. The canvas after the checked prompt, the prompt's embeddings (images merged) and every position."""
        config, inputs, input_ids = request.config, request.inputs, request.input_ids
        inputs_embeds, attention_mask = inputs["inputs_embeds"], inputs["attention_mask"]
        # With `inputs_embeds` alone the prompt's tokens are unknown: pad ids stand in for them (attended through
        # the attention mask, never output), and the result holds the answer only, as transformers returns it.
        prompt_known = input_ids is not None or inputs_embeds is None
        if not prompt_known:
            if request.tokens_hook is not None or request.logits_hook is not None:
                raise ValueError("The generation hooks see prompt tokens; with inputs_embeds, also pass input_ids.")
            input_ids = torch.full(inputs_embeds.shape[:2], config.pad_token_id, dtype=torch.long)
            attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        input_ids, attention_mask = check_prompt(
            input_ids, attention_mask, config.mask_token_id, self.config, self.device
        )
        batch_size, prompt_len = input_ids.shape
        canvas = initial_canvas(config, request.template, batch_size, prompt_len, self.config, self.device)
        if inputs_embeds is not None:
            inputs_embeds = inputs_embeds.to(self.device, self.dtype)
        prompt_embeds, placeholder_ids = self._embed_inputs(
            input_ids if prompt_known else None, inputs_embeds, inputs["pixel_values"], inputs["image_grid_thw"],
            inputs["mm_token_type_ids"], has_position_ids=False,
        )
        sequences = torch.cat([input_ids, canvas], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(canvas.shape)], dim=1)
        if request.tokens_hook is not None:
            sequences = checked_hook_tokens(request.tokens_hook(None, sequences, None), sequences, canvas.shape[1])
        rope_prompt = input_ids if placeholder_ids is None else placeholder_ids
        rope_ids = torch.cat([rope_prompt, sequences[:, prompt_len:]], dim=1)
        position_ids, _ = self._rope_positions(rope_ids, inputs["image_grid_thw"], attention_mask)
        repeats = config.num_return_sequences
        if repeats > 1:
            sequences, attention_mask, prompt_embeds = (
                t.repeat_interleave(repeats, dim=0) for t in (sequences, attention_mask, prompt_embeds)
            )
            position_ids = position_ids.repeat_interleave(repeats, dim=1)
        answer_positions = torch.arange(sequences.shape[1], device=self.device) >= prompt_len
        counted = attention_mask.bool() if prompt_known else answer_positions
        return self._plan_steps(
            request, sequences, prompt_len, prompt_known, prompt_embeds, position_ids, attention_mask, counted
        )

    def _plan_steps(
        self,
        request: _GenerateRequest,
        sequences: torch.LongTensor,
        prompt_len: int,
        prompt_known: bool,
        prompt_embeds: torch.Tensor,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        counted: torch.Tensor,
    ) -> _DecodingPlan:
        """2. The step plan: blocks and their step budget, the timestep grid, banned and stop tokens, the cache and
        the compiled forward."""
        config = request.config
        answer_len = sequences.shape[1] - prompt_len
        block_len = min(config.block_length or answer_len, answer_len)
        num_blocks = -(-answer_len // block_len)
        if num_blocks > 1 and (request.tokens_hook is not None or request.logits_hook is not None):
            raise ValueError(
                "generation_tokens_hook_func / generation_logits_hook_func follow the reference's single-block "
                "decoding; unset block_length (or make it >= max_new_tokens) to use them."
            )
        block_sizes = [min(block_len, answer_len - start) for start in range(0, answer_len, block_len)]
        steps_per_block = split_steps(config.steps or answer_len, block_sizes)
        banned_ids = [config.mask_token_id] + [getattr(self.config, name) for name in VISION_TOKEN_KEYS]
        banned_ids += list(config.suppress_tokens or []) + [words[0] for words in config.bad_words_ids or []]
        banned = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=sequences.device)
        banned[[i for i in banned_ids if i is not None and 0 <= i < self.config.vocab_size]] = True
        compile_config = config.compile_config or CompileConfig(mode="default")
        return _DecodingPlan(
            config=config,
            sequences=sequences,
            prompt_len=prompt_len,
            prompt_known=prompt_known,
            prompt_embeds=prompt_embeds,
            position_ids=position_ids,
            attention_mask=None if bool(attention_mask.all()) else attention_mask,
            counted=counted,
            banned=banned,
            stop_ids=torch.tensor(stop_token_ids(config), dtype=torch.long, device=sequences.device),
            answer_masks_at_start=(sequences[:, prompt_len:] == config.mask_token_id).sum(dim=1),
            fixed=sequences[:, prompt_len:] != config.mask_token_id,
            block_len=block_len,
            steps_per_block=steps_per_block,
            block_steps=steps_per_block[0],
            timesteps=torch.linspace(1, config.eps, steps_per_block[0] + 1, device=sequences.device),
            tokens_hook=request.tokens_hook,
            logits_hook=request.logits_hook,
            cache=DimpleDiffusionCache(self.config.num_hidden_layers) if config.use_cache else None,
            compiled_forward=self.get_compiled_call(compile_config) if config.compile_forward else None,
        )

    def _decode_block(
        self, plan: _DecodingPlan, block_start: int, record: _DecodingRecord, draft_streamer: Any
    ) -> None:
        """3-4. The steps of one block: until no mask is left in it (`dim`) or its steps are spent."""
        config, mask_id = plan.config, plan.config.mask_token_id
        answer_index = torch.arange(plan.answer_len, device=plan.sequences.device)
        in_block = (answer_index >= block_start) & (answer_index < block_start + plan.block_len)
        block_masks_at_start = ((plan.canvas == mask_id) & in_block).sum(dim=1)
        masks_left = int(block_masks_at_start.sum())  # one host synchronisation per block ...
        if masks_left == 0:
            return
        for step in range(plan.block_steps):
            masked = (plan.canvas == mask_id) & in_block
            # (row, answer index) of every mask; its size is known on the host, so no synchronisation here.
            coords = torch.nonzero_static(masked, size=masks_left)
            window, logits, masked_logits = self._step_logits(plan, step, block_start, coords)
            record.forward_passes += 1
            canvas = self._commit_step(plan, step, masked, coords, masked_logits, block_masks_at_start, record)
            if plan.tokens_hook is not None:
                updated = torch.cat([window[:, : -plan.answer_len], canvas], dim=1)
                updated = checked_hook_tokens(plan.tokens_hook(step, updated, logits), updated, plan.answer_len)
                canvas = updated[:, -plan.answer_len :]
            plan.sequences[:, plan.prompt_len :] = canvas
            if config.output_history:
                record.history.append(plan.sequences.clone())
            if draft_streamer is not None:
                draft_streamer.put_draft(canvas.cpu())
            masks_left = int(((canvas == mask_id) & in_block).sum())  # ... and one per step
            if config.decoding_pipeline == "dim" and masks_left == 0:
                break
        record.unfinished += masks_left

    def _step_logits(
        self, plan: _DecodingPlan, step: int, block_start: int, coords: torch.LongTensor
    ) -> tuple[torch.LongTensor, torch.Tensor | None, torch.Tensor]:
        """3. One forward pass over the step's window. Returns the window's ids, the hooks' logits (every position,
        shifted so that index i predicts token i; None without hooks) and the masked positions' logits (K, vocab)
        in `coords` order, a tensor of their own (the commit phase changes them in place).

        Where logits are cut is decided here only: hooks see every position; a compiled forward keeps every row
        (one static shape) and the masked rows are gathered afterwards; otherwise the LM head runs on them only.
        The first step (and every step without the cache) reads the whole sequence; later steps read the block
        from one position before it (logits at position i predict token i + 1) to the end of the block.
        """
        total_len = plan.sequences.shape[1]
        start, end = 0, total_len
        if plan.cache is not None and step > 0:
            start = plan.prompt_len + block_start - 1
            end = min(plan.prompt_len + block_start + plan.block_len, total_len)
            plan.cache.set_window(start)
        answer_embeds = self.get_input_embeddings()(plan.sequences[:, max(start, plan.prompt_len) : end])
        embeds = torch.cat([plan.prompt_embeds[:, start:], answer_embeds], dim=1)
        keep = torch.stack([coords[:, 0], coords[:, 1] + (plan.prompt_len - 1 - start)], dim=1)
        # Passes that fill the cache run eagerly, so its buffers live outside any graph at fixed addresses.
        compiled = plan.compiled_forward is not None and (plan.cache is None or step > 0)
        position_ids = plan.position_ids[..., start:end]
        if compiled:
            mark_request_sizes_dynamic(embeds, position_ids, plan.attention_mask)
        logits = (plan.compiled_forward if compiled else self)(
            inputs_embeds=embeds,
            attention_mask=plan.attention_mask,
            position_ids=position_ids,
            cache=plan.cache,
            logits_to_keep=0 if plan.hooked or compiled else keep,
        ).logits
        window = plan.sequences[:, start:end]
        if not plan.hooked:
            return window, None, logits[keep[:, 0], keep[:, 1]] if compiled else logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        if plan.logits_hook is not None:
            logits = plan.logits_hook(step, window, logits)
        return window, logits, logits[:, -plan.answer_len :][coords[:, 0], coords[:, 1]]

    def _commit_step(
        self,
        plan: _DecodingPlan,
        step: int,
        masked: torch.Tensor,
        coords: torch.LongTensor,
        logits: torch.Tensor,
        block_masks_at_start: torch.Tensor,
        record: _DecodingRecord,
    ) -> torch.LongTensor:
        """4. Propose a token for every masked position, then commit per row those the pipeline's rule picks;
        returns the new canvas. Token rules (repetition penalty, min_new_tokens) act on the logits first."""
        config, rows, columns = plan.config, coords[:, 0], coords[:, 1]
        logits = logits.float()  # the step's own (K, vocab) rows (a copy only from bfloat16): changed in place below
        record.nonfinite_steps += has_nonfinite_logits(logits)
        if config.repetition_penalty not in (None, 1.0):
            present = plan.counted & (plan.sequences != config.mask_token_id)
            seen = token_presence(plan.sequences, present, self.config.vocab_size)
            logits = penalize_repetitions(logits, seen[rows], config.repetition_penalty)
        if config.min_new_tokens:
            forbid_tokens(logits, columns < config.min_new_tokens, plan.stop_ids)
        use_original = config.use_original_confidence and config.decoding_pipeline == "dim"
        tokens, probs = propose_tokens(
            logits, config.temperature, config.top_p, config.top_k, plan.banned, original_confidence=use_original
        )
        scores = token_confidence(config.alg, probs, tokens)
        confidence = torch.full(masked.shape, float("-inf"), device=masked.device).index_put((rows, columns), scores)
        if config.output_scores:
            record.scores.append(confidence)
        if config.decoding_pipeline == "dim":
            commit = dimple_commit_mask(
                config.alg, config.alg_p_threshold, config.alg_temp, step, plan.block_steps, confidence, masked,
                block_masks_at_start, plan.timesteps,
            )
        else:
            commit = dream_commit_mask(
                config.alg, config.alg_temp, step, plan.block_steps, confidence, masked, plan.timesteps
            )
        return torch.where(commit, plan.canvas.index_put((rows, columns), tokens), plan.canvas)

    def _finish(
        self, plan: _DecodingPlan, record: _DecodingRecord, tokenizer: Any, streamer: Any
    ) -> torch.LongTensor | DimpleGenerationOutput:
        """5. Warn about NaN logits and unfilled slots, end rows at stop strings, stream the final text, and
        return the sequences (or the output with the decoding statistics)."""
        config, prompt_len = plan.config, plan.prompt_len
        warn_about_nonfinite_logits(int(record.nonfinite_steps), record.forward_passes)
        if record.unfinished:
            logger.warning(
                f"{record.unfinished} <|mask|> token(s) are still in the answer after {sum(plan.steps_per_block)} "
                f"step(s) (steps={config.steps}, alg={config.alg!r}, alg_p_threshold={config.alg_p_threshold}); "
                "raise `steps` or enable confident decoding to fill every slot."
            )
        if config.stop_strings is not None:
            stop_strings = [config.stop_strings] if isinstance(config.stop_strings, str) else config.stop_strings
            plan.sequences[:, prompt_len:] = end_at_stop_strings(
                plan.canvas, stop_strings, tokenizer, config.pad_token_id, plan.fixed
            )
        if streamer is not None:
            stop_ids = plan.stop_ids.tolist()
            keep_len = int(answer_lengths(plan.canvas, stop_ids)[0]) if stop_ids else plan.answer_len
            streamer.put(plan.canvas[:, :keep_len].cpu())
            streamer.end()
        shown = slice(None) if plan.prompt_known else slice(prompt_len, None)
        if not config.return_dict_in_generate:
            return plan.sequences[:, shown]
        committed = plan.answer_masks_at_start - (plan.canvas == config.mask_token_id).sum(dim=1)
        return DimpleGenerationOutput(
            sequences=plan.sequences[:, shown],
            history=tuple(snapshot[:, shown] for snapshot in record.history) if config.output_history else None,
            scores=tuple(record.scores) if config.output_scores else None,
            num_forward_passes=record.forward_passes,
            tokens_per_forward=committed.float() / max(record.forward_passes, 1),
        )


def check_decoding_choice(config: DimpleGenerationConfig) -> None:
    """Settings that are valid alone but wasted together: refused (or reported) as transformers does."""
    if config.num_return_sequences > 1 and config.is_deterministic():
        raise ValueError(
            f"num_return_sequences={config.num_return_sequences} with greedy decoding would return identical "
            "answers at that many times the compute; sample (do_sample=True or temperature > 0, or a random position "
            "rule such as alg='origin') or set num_return_sequences=1."
        )
    if config.do_sample is False and config.temperature:
        logger.warning_once(
            f"do_sample=False decodes greedily, so temperature={config.temperature} has no effect; unset do_sample "
            "(or set do_sample=True) to sample."
        )
    for flag in ("output_history", "output_scores"):
        if getattr(config, flag) and not config.return_dict_in_generate:
            raise ValueError(f"{flag}=True needs return_dict_in_generate=True (the result lives in the output).")


def check_streamed_request(request: _GenerateRequest) -> None:
    """`num_return_sequences` > 1 multiplies the answers after the prompt was streamed as one row, so a single-answer
    streamer would fail only after the last step (and a `TextIteratorStreamer` consumer wait): refuse before the
    first. A batch of prompts is the streamer's own business, as in transformers (`TextStreamer` refuses it at once,
    a batch-aware streamer such as a step clock takes it)."""
    copies = request.config.num_return_sequences
    if copies > 1:
        raise ValueError(
            f"A streamer follows a single answer, but this call makes {copies} per prompt "
            f"(num_return_sequences={copies}); drop the streamer or set num_return_sequences=1."
        )


class DiffusionDecoding:
    """One request's decoding as steps a caller drives (made by `DimpleGenerationMixin.start_decoding`).

    Each step the caller runs one forward pass that recomputes the keys/values of `window()` (sequence columns;
    the others come from the request's cache), reads the logits of `logit_columns()` (in that order; the output
    at column i predicts token i + 1) and hands them to `advance`. When `done`, `finish()` returns the
    sequences as `generate()` would. The same phases as `generate()`'s steps and the same private rules, so a
    request decoded this way gets `generate()`'s answer.
    """

    def __init__(self, model: "DimpleGenerationMixin", plan: _DecodingPlan, tokenizer: Any, streamer: Any):
        self.model, self.plan, self.tokenizer, self.streamer = model, plan, tokenizer, streamer
        self.record = _DecodingRecord(nonfinite_steps=torch.zeros((), dtype=torch.long, device=plan.sequences.device))
        self.block_start, self.step, self.done = -plan.block_len, 0, False
        if streamer is not None:
            prompt = plan.sequences[:, : plan.prompt_len]
            streamer.put(prompt.cpu() if plan.prompt_known else prompt[:, :0].cpu())
        self._next_block()

    @property
    def length(self) -> int:
        """Columns of the sequence (prompt + answer)."""
        return self.plan.sequences.shape[1]

    @property
    def prompt_len(self) -> int:
        return self.plan.prompt_len

    def _next_block(self) -> None:
        """Move to the next block that still holds a mask (`done` after the last)."""
        plan, mask_id = self.plan, self.plan.config.mask_token_id
        answer_index = torch.arange(plan.answer_len, device=plan.sequences.device)
        while True:
            self.block_start += plan.block_len
            if self.block_start >= plan.answer_len:
                self.done = True
                return
            plan.enter_block(self.block_start)
            self.in_block = (answer_index >= self.block_start) & (answer_index < self.block_start + plan.block_len)
            self.block_masks_at_start = ((plan.canvas == mask_id) & self.in_block).sum(dim=1)
            self.masks_left = int(self.block_masks_at_start.sum())
            if self.masks_left:
                self.step = 0
                self._find_masks()
                return

    def _find_masks(self) -> None:
        self.masked = (self.plan.canvas == self.plan.config.mask_token_id) & self.in_block
        self.coords = torch.nonzero_static(self.masked, size=self.masks_left)

    def window(self) -> tuple[int, int]:
        """The columns [start, end) this step recomputes: all of them at a block's first step or without the cache,
        else the block from one column before it."""
        plan = self.plan
        if plan.cache is None or self.step == 0:
            return 0, self.length
        start = plan.prompt_len + self.block_start - 1
        return start, min(start + 1 + plan.block_len, self.length)

    def inputs(self, start: int, end: int) -> tuple[torch.Tensor, torch.LongTensor]:
        """Embeddings (1, end - start, hidden) and M-RoPE positions (3, 1, end - start) of columns [start, end)."""
        plan = self.plan
        answer_embeds = self.model.get_input_embeddings()(plan.sequences[:, max(start, plan.prompt_len) : end])
        embeds = torch.cat([plan.prompt_embeds[:, start : min(end, plan.prompt_len)], answer_embeds], dim=1)
        return embeds, plan.position_ids[..., start:end]

    def logit_columns(self) -> torch.LongTensor:
        """The columns whose logits this step needs: the one before each masked answer slot, in slot order."""
        return self.coords[:, 1] + (self.plan.prompt_len - 1)

    def advance(self, logits: torch.Tensor) -> None:
        """Commit this step's tokens from the logits of `logit_columns()` (K, vocab), then move to the next step."""
        self.apply(self.model._commit_step(
            self.plan, self.step, self.masked, self.coords, logits, self.block_masks_at_start, self.record
        ))

    def apply(self, canvas: torch.LongTensor) -> None:
        """Move to the next step with this step's committed canvas (1, answer_len): what `advance` does after the
        selection rule, for a caller that ran the rule for several requests at once (the batching engine)."""
        plan = self.plan
        self.record.forward_passes += 1
        plan.sequences[:, plan.prompt_len :] = canvas
        if plan.config.output_history:
            self.record.history.append(plan.sequences.clone())
        if hasattr(self.streamer, "put_draft"):
            self.streamer.put_draft(canvas.cpu())
        self.masks_left = int(((canvas == plan.config.mask_token_id) & self.in_block).sum())
        self.step += 1
        if (plan.config.decoding_pipeline == "dim" and self.masks_left == 0) or self.step == plan.block_steps:
            self.record.unfinished += self.masks_left
            self._next_block()
        else:
            self._find_masks()

    def finish(self) -> torch.LongTensor | DimpleGenerationOutput:
        """Phase 5 of `generate()`: warnings, stop strings, the streamer's final text, the output."""
        return self.model._finish(self.plan, self.record, self.tokenizer, self.streamer)


def mark_request_sizes_dynamic(
    embeds: torch.Tensor, position_ids: torch.LongTensor, attention_mask: torch.Tensor | None
) -> None:
    """Tell dynamo that batch size and lengths vary between requests, so one compiled step serves them all instead
    of one graph per prompt length (and eager steps once the recompile limit is hit)."""
    for tensor, dims in ((embeds, (0, 1)), (position_ids, (1, 2)), (attention_mask, (0, 1))):
        for dim in dims if tensor is not None else ():
            torch._dynamo.maybe_mark_dynamic(tensor, dim)


def warn_about_nonfinite_logits(bad_steps: int, forward_passes: int) -> None:
    """NaN/inf logits make confidences meaningless and the answer garbage; a warning (not an error) because the
    other rows of a batch may be fine and the output is still returned for inspection."""
    if bad_steps:
        logger.warning(
            f"The logits held NaN or inf at {bad_steps} of {forward_passes} step(s), so the answer is meaningless. "
            "Check the weights (load with strict=True, the default, to refuse non-finite weights) and the dtype: "
            "float16 can overflow where bfloat16 or float32 do not."
        )
