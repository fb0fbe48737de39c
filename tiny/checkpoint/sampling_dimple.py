"""The unmasking rules of diffusion decoding: small pure functions, one job each.

Each works on the K masked positions of a step (flattened logits and probabilities, (K, vocab)) or on
(batch, answer_len) grids, and returns what its name says: proposed tokens, confidences, per-row commit counts,
or a boolean mask of positions to commit. Put `dimple_commit_mask` beside Fast-dLLM's `get_transfer_index`: both
take confidences and the masked positions and return the positions to fill now.

Unlike the reference, every count and every top-k is computed per row, so a row's answer never depends on its batch
mates; at batch size 1 the arithmetic (float32 schedule, strict `>` threshold, argmax and confidence definitions)
is the reference's.
"""

from typing import Any

import torch


def propose_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    banned: torch.Tensor,
    original_confidence: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate token per masked position, and the distribution (K, V) its confidence is read from.

    `logits` (float, owned by the caller) is consumed: every step would otherwise copy (K, vocab) floats several
    times. The `banned` ids (mask, vision, suppressed and bad words) leave it first, as transformers suppresses
    before it warps, so a ban takes no top-k slot and no nucleus mass. Then temperature, top-p and top-k shape it,
    and the token is its argmax (temperature 0) or a sample. The confidence distribution is that filtered one, or
    with `original_confidence` the softmax before temperature and filters (computed only when they differ).
    """
    logits.masked_fill_(banned, float("-inf"))
    reshaped = temperature > 0 or (top_p is not None and top_p < 1) or bool(top_k)
    original = logits.softmax(dim=-1) if original_confidence and reshaped else None
    if temperature > 0:
        logits.div_(temperature)
    if top_p is not None and top_p < 1:
        keep_nucleus_(logits, top_p)
    if top_k:
        keep_top_k_(logits, top_k)
    filtered = softmax_(logits)
    if temperature > 0:
        tokens = torch.multinomial(filtered, num_samples=1).squeeze(-1)
    else:
        tokens = filtered.argmax(dim=-1)
    return tokens, filtered if original is None else original


def softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, in place (the logits are not needed afterwards)."""
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=-1, keepdim=True))


def keep_top_k_(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """transformers' top-k rule in place: -inf below the k-th largest logit of the row (ties at it are kept)."""
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
    return logits.masked_fill_(logits < kth, float("-inf"))


def keep_nucleus_(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' top-p rule in place: -inf for the least likely tokens whose cumulative probability stays
    within 1 - top_p (the most likely token always stays)."""
    ascending, order = logits.sort(dim=-1)
    outside = softmax_(ascending).cumsum_(dim=-1) <= 1 - top_p
    outside[:, -1] = False
    return logits.masked_fill_(outside.scatter(1, order, outside), float("-inf"))


def token_confidence(alg: str, probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Confidence per masked position: probability of the token, top-1 minus top-2, or negative entropy."""
    if alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if alg == "entropy":
        return (probs + 1e-10).log_().mul_(probs).sum(dim=-1)
    return probs.gather(-1, tokens[:, None]).squeeze(-1)


def snapped_commit_counts(
    masks_left: torch.Tensor, masks_at_start: torch.Tensor, step: int, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`dim` fallback: how many tokens each row commits now, and the grid value s that gave that count.

    The row's progress r = masks_left / masks_at_start is snapped to the first grid point s ahead of both r and
    the current step for which floor(masks_left * (1 - s / r)) >= 1; the final grid point means "all".
    """
    steps = timesteps.numel() - 1
    ratio = masks_left / masks_at_start.clamp(min=1)
    first_below = (timesteps[None, :] >= ratio[:, None]).sum(dim=1)
    start = first_below.clamp(min=step + 1)
    counts = (masks_left[:, None].float() * (1 - timesteps[None, :] / ratio[:, None])).nan_to_num(0.0).long()
    counts[:, -1] = masks_left
    index = torch.arange(steps + 1, device=timesteps.device)
    usable = (index[None, :] >= start[:, None]) & (counts >= 1)
    chosen = torch.where(usable.any(dim=1), usable.int().argmax(dim=1), steps)
    row_counts = counts.gather(1, chosen[:, None]).squeeze(1)
    return torch.where(masks_left > 0, row_counts, 0), timesteps[chosen]


def split_steps(steps: int, block_sizes: list[int]) -> list[int]:
    """`steps` (the most forward passes in total) split over blocks in proportion to their sizes: one each, the
    rest by largest remainder, so the shares sum to `steps` and equal blocks get equal shares (earlier first)."""
    if steps < len(block_sizes):
        raise ValueError(
            f"steps={steps} is fewer than the {len(block_sizes)} blocks of block_length {block_sizes[0]}; each block "
            "needs at least one forward pass. Raise steps or block_length."
        )
    spare, total = steps - len(block_sizes), sum(block_sizes)
    shares = [1 + spare * size // total for size in block_sizes]
    remainders = sorted(range(len(block_sizes)), key=lambda i: (-(spare * block_sizes[i] % total), i))
    for index in remainders[: steps - sum(shares)]:
        shares[index] += 1
    return shares


def linear_commit_counts(masks_left: torch.Tensor, step: int, timesteps: torch.Tensor) -> torch.Tensor:
    """`dream` schedule: commit floor(masks_left * (1 - s / t)) at grid step t -> s, everything at the end."""
    if step == timesteps.numel() - 2:
        return masks_left
    t, s = timesteps[step], timesteps[step + 1]
    return (masks_left.float() * (1 - s / t)).long()


def most_confident_mask(
    confidence: torch.Tensor, masked: torch.Tensor, counts: torch.Tensor, alg_temp: float | None
) -> torch.Tensor:
    """Per row, the `counts` masked positions of highest confidence, or sampled from softmax(conf / alg_temp)."""
    scores = confidence
    if alg_temp:
        logp = (confidence / alg_temp).masked_fill(~masked, float("-inf")).log_softmax(dim=-1)
        gumbel = -torch.log(-torch.log(torch.rand_like(logp).clamp(min=1e-20)))
        scores = logp + gumbel
    return top_count_mask(scores.masked_fill(~masked, float("-inf")), counts) & masked


def random_mask(masked: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per row, `counts` masked positions uniformly at random (alg `origin`)."""
    return top_count_mask(torch.rand(masked.shape, device=masked.device).masked_fill(~masked, -1.0), counts) & masked


def leftmost_mask(masked: torch.Tensor) -> torch.Tensor:
    """The first masked position of each row (alg `autoregressive`)."""
    first = torch.zeros_like(masked)
    first.scatter_(1, masked.int().argmax(dim=1, keepdim=True), True)
    return first & masked


def top_count_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean grid: True where a position is among the `counts[row]` highest scores of its row."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    return ranks < counts[:, None]


def scheduled_mask(
    alg: str, confidence: torch.Tensor, masked: torch.Tensor, counts: torch.Tensor, alg_temp: float | None
) -> torch.Tensor:
    """Positions an algorithm commits once the schedule has fixed each row's count."""
    if alg == "autoregressive":
        return leftmost_mask(masked)
    if alg == "origin":
        return random_mask(masked, counts)
    return most_confident_mask(confidence, masked, counts, alg_temp)


def dimple_commit_mask(
    alg: str,
    alg_p_threshold: float | None,
    alg_temp: float | None,
    step: int,
    steps: int,
    confidence: torch.Tensor,
    masked: torch.Tensor,
    masks_at_start: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """Dimple's rule (`dim` pipeline), the positions to commit: per row, every masked position whose confidence
    passes `alg_p_threshold` (all of them at the last step); rows where none passes use the snapped schedule."""
    masks_left = masked.sum(dim=1)
    counts, grid_value = snapped_commit_counts(masks_left, masks_at_start, step, timesteps)
    if alg == "origin-ratio":
        ratio = masks_left / masks_at_start.clamp(min=1)
        is_last = grid_value == timesteps[-1]
        probability = torch.where(is_last, torch.ones_like(ratio), 1 - grid_value / ratio)
        chosen = (torch.rand(masked.shape, device=masked.device) < probability[:, None]) & masked
    else:
        chosen = scheduled_mask(alg, confidence, masked, counts, alg_temp)
    if not alg_p_threshold:
        return chosen
    confident = masked if step == steps - 1 else masked & (confidence > alg_p_threshold)
    return torch.where(confident.any(dim=1, keepdim=True), confident, chosen)


def dream_commit_mask(
    alg: str,
    alg_temp: float | None,
    step: int,
    steps: int,
    confidence: torch.Tensor,
    masked: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """Dream's rule (`dream` pipeline), the positions to commit: a linear schedule over exactly `steps` steps."""
    if alg == "autoregressive":
        return leftmost_mask(masked)
    if alg == "origin":
        t, s = timesteps[step], timesteps[step + 1]
        probability = 1.0 if step == steps - 1 else 1 - s / t
        return (torch.rand(masked.shape, device=masked.device) < probability) & masked
    counts = linear_commit_counts(masked.sum(dim=1), step, timesteps)
    return most_confident_mask(confidence, masked, counts, alg_temp)


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
    """Set `token_ids` to -inf in the selected rows, in place (min_new_tokens: no stop token before position N)."""
    if token_ids.numel() == 0:
        return logits
    logits[:, token_ids] = logits[:, token_ids].masked_fill(rows[:, None], float("-inf"))
    return logits


def end_at_stop_strings(
    answers: torch.LongTensor, stop_strings: list[str], tokenizer: Any, fill_id: int, fixed: torch.Tensor
) -> torch.LongTensor:
    """Per row, every token after the one that completes the first stop string becomes `fill_id` (EOS), so the
    answer ends there (decoders and `post_process_image_text_to_text` cut at it); the stop string is kept, and so
    is every `fixed` token (a structure prior's text never changes).

    A row is decoded once; only a row holding a stop string is searched, by bisection over its prefixes (a prefix
    that holds a stop string stays holding it as it grows), so the cost is O(log answer_len) decodes per row."""
    answers = answers.clone()
    for row, row_fixed in zip(answers, fixed):
        ids = row.tolist()

        def holds_stop(end: int) -> bool:
            text = tokenizer.decode(ids[:end])
            return any(stop in text for stop in stop_strings)

        if not holds_stop(len(ids)):
            continue
        low, high = 1, len(ids)  # the shortest prefix holding a stop string lies in [low, high]
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if holds_stop(middle) else (middle + 1, high)
        row[high:] = torch.where(row_fixed[high:], row[high:], fill_id)
    return answers


def stop_token_ids(config: Any) -> list[int]:
    """The ids that end an answer: `eos_token_id` (one id or a list) and `pad_token_id`, of a model or generation
    config; unset ones are left out."""
    ids = []
    for value in (config.eos_token_id, config.pad_token_id):
        ids += value if isinstance(value, (list, tuple)) else [value]
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]


def answer_lengths(answers: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """Per row, the number of answer tokens before the first stop token (EOS, `<|endoftext|>`): where a diffusion
    answer, which fills every slot of its canvas, ends. The one rule for streamers, the server and the processor."""
    stops = torch.isin(answers, torch.tensor(stop_ids, dtype=answers.dtype, device=answers.device))
    return (~stops).cumprod(dim=1).sum(dim=1)  # leading non-stop tokens; 0 for an empty or all-stop answer


def has_nonfinite_logits(logits: torch.Tensor) -> torch.Tensor:
    """0-d tensor: whether any row holds NaN or +inf, computed on the device (no host synchronisation).

    A row's float32 sum is NaN or +inf exactly then; -inf (tokens banned by a logits hook) keeps it at -inf."""
    sums = logits.sum(dim=-1, dtype=torch.float32)
    return (sums.isnan() | (sums == float("inf"))).any()
