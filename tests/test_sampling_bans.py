"""Banned ids (the mask token, vision tokens, `suppress_tokens`, one-token `bad_words_ids`) leave the distribution
before top-k / top-p pick their tokens, as transformers suppresses before it warps (issue 25 item 3): a ban never
takes a top-k slot or nucleus mass, and nothing falls back to the unfiltered distribution."""

import pytest
import torch

from dimple.sampling_dimple import propose_tokens
from prompts import encode


def favour(tokens_and_logits: dict[int, float]):
    """A logits hook that leaves only the given tokens with non-zero logits."""

    def hook(step, x, logits):
        logits = torch.zeros_like(logits)
        for token, value in tokens_and_logits.items():
            logits[..., token] = value
        return logits

    return hook


def sampled_answers(model, inputs, seeds=range(6), **settings) -> set[tuple[int, ...]]:
    answers = set()
    for seed in seeds:
        torch.manual_seed(seed)
        out = model.generate(**inputs, max_new_tokens=6, do_sample=True, alg="maskgit_plus", **settings)
        answers.add(tuple(out[0, -6:].tolist()))
    return answers


@pytest.mark.parametrize("ban", ["suppress_tokens", "bad_words_ids", "mask_token"])
def test_top_k_1_after_a_ban_is_the_best_allowed_token_for_every_seed(model, processor, ban):
    """The favourite is banned; the runner-up (logit 3 against 500 zeros: about 4% of the mass) is the only top-1
    token left, so every seed gives the same answer of it."""
    inputs = encode(processor, ["Hello."])
    favourite = model.config.mask_token_id if ban == "mask_token" else 300
    settings = {"suppress_tokens": [300]} if ban == "suppress_tokens" else {}
    settings |= {"bad_words_ids": [[300]]} if ban == "bad_words_ids" else {}
    hook = favour({favourite: 20.0, 301: 3.0})
    answers = sampled_answers(model, inputs, top_k=1, generation_logits_hook_func=hook, **settings)
    assert answers == {(301,) * 6}


def test_a_banned_favourite_takes_no_nucleus_mass(model, processor):
    """top_p 0.5 after the ban keeps the runner-up alone (its share of the allowed mass is about 95%)."""
    inputs = encode(processor, ["Hello."])
    hook = favour({300: 20.0, 301: 9.0})
    answers = sampled_answers(model, inputs, top_p=0.5, suppress_tokens=[300], generation_logits_hook_func=hook)
    assert answers == {(301,) * 6}


def test_bans_come_before_the_filters_in_the_proposal_rule():
    """Row 0: top-2 over the allowed tokens is {1, 2}, never 0 (banned) nor 3. Row 1: the allowed top-1 is 3."""
    logits = torch.tensor([[9.0, 5.0, 5.0, 1.0], [9.0, 0.0, 0.0, 2.0]])
    banned = torch.tensor([True, False, False, False])
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        tokens, probs = propose_tokens(logits.clone(), 1.0, None, 2, banned, original_confidence=False)
        seen.add(int(tokens[0]))
        assert int(tokens[1]) in (1, 2, 3)
        assert probs[:, 0].eq(0).all() and torch.allclose(probs.sum(dim=-1), torch.ones(2))
    assert seen == {1, 2}
    tokens, _ = propose_tokens(logits.clone(), 1.0, None, 1, banned, original_confidence=False)
    assert tokens.tolist()[1] == 3
