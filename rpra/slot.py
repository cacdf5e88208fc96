"""Reading a score from token probabilities at a grammar-forced slot.

After the runtime has written ``Rating: [[`` the only continuations the slot's grammar allows are
``1]]``, ``2]]`` ... ``10]]``. Instead of sampling one of them (a noisy single digit) we compute
the probability the model assigns to each, restricted to the grammar: at every step the softmax is
taken over the tokens the grammar allows there. Labels that span several tokens ("10" is "1","0"
for most tokenizers) are handled with a token trie: the labels' token sequences, each followed by
the closing token so that "1" and "10" part ways at the second step, cost one extra one-token
decode per branching point (one, for a 1..10 scale) and nothing else.

This module is pure: the model is reached through a ``next_logits(path)`` callback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# next_logits(path) -> logits over the vocabulary after the slot prefix plus ``path`` tokens.
NextLogits = Callable[[Sequence[int]], np.ndarray]


class ScoreSlot:
    """The finite grammar ``label close`` over the scale's labels, with exact constrained scoring."""

    def __init__(self, label_tokens: Sequence[Sequence[int]], close_token: int):
        seqs = [(*tokens, close_token) for tokens in label_tokens]
        if any(len(tokens) == 0 for tokens in label_tokens):
            raise ValueError("every label needs at least one token")
        if len(set(seqs)) != len(seqs):
            raise ValueError("two labels tokenize identically; the slot could not tell them apart")
        self.sequences: list[tuple[int, ...]] = seqs

    def logprobs(self, next_logits: NextLogits) -> list[float]:
        """Log-probability of each label under the grammar-constrained model (they sum to 1 in prob)."""
        out = [0.0] * len(self.sequences)
        self._walk((), list(range(len(self.sequences))), 0.0, next_logits, out)
        return out

    def _walk(self, path: tuple[int, ...], members: list[int], acc: float, next_logits: NextLogits, out: list[float]) -> None:
        depth = len(path)
        children: dict[int, list[int]] = {}
        for i in members:
            children.setdefault(self.sequences[i][depth], []).append(i)
        logits = np.asarray(next_logits(path), dtype=np.float64)
        allowed = np.fromiter(children, dtype=np.int64)
        chosen = logits[allowed]
        # log-softmax over the allowed tokens only: the grammar renormalises the distribution.
        logz = chosen.max() + np.log(np.exp(chosen - chosen.max()).sum())
        for token, logit in zip(allowed.tolist(), chosen.tolist()):
            group = children[token]
            step = acc + logit - logz
            if len(group) == 1:
                # Only one label continues here; the rest of its tokens are forced (probability 1).
                out[group[0]] = step
            else:
                self._walk((*path, token), group, step, next_logits, out)
