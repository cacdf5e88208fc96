"""The text of an RPRA turn: one definition, shared by the runtime and the fine-tuning job.

An assistant turn is laid out in pieces, each tokenized on its own (so the runtime and the
training data produce the same tokens at the boundaries):

    PA:    "Rating: [["  SCORE  "]]\n"  ANSWER
    RPRA:  "Thinking: "  REASONING  "\nRating: [["  SCORE  "]]\n"  ANSWER

The runtime writes the fixed pieces itself; the model only fills REASONING, SCORE (read from token
probabilities, never sampled) and ANSWER. The rating format is MT-Bench's judge format, which
small instruction-tuned models have seen.
"""

from __future__ import annotations

import re
import unicodedata

from rpra.config import Protocol

PROMPT_VERSION = "rpra-prompts/1"

REASONING_OPEN = "Thinking: "
SLOT_OPEN = {"pa": "Rating: [[", "rpra": "\nRating: [["}
SLOT_CLOSE = "]]"
ANSWER_OPEN = "\n"
SCORE_CLOSE = SLOT_CLOSE + ANSWER_OPEN  # written after the score as one piece


def system_prompt(protocol: Protocol, scale_max: int, *, report_card: str | None = None) -> str:
    """The instructions the predictor puts before the conversation.

    Kept short on purpose: SmolLM2-135M's answers got markedly worse under a longer instruction
    (measured by hand on a few prompts; see docs/architecture.md).
    """
    thought = "a one-line thought, 'Thinking: ...', then " if protocol == "rpra" else ""
    text = (
        f"You are a helpful assistant. Start every reply with {thought}a self-rating of your answer's "
        f"quality, 'Rating: [[N]]' (N from 1 to {scale_max}), then give the answer."
    )
    if report_card:
        text += f"\n\nWhat a judge found about your past answers:\n{report_card.strip()}"
    return text


# AutoMix-style self-verification (Aggarwal et al. 2023), a baseline of the benchmark: the device
# model is shown its own answer and asked, few-shot, whether it is correct; P(yes) is the score.
SELF_CHECK_SHOTS = (
    ("What is 7 + 5?", "12", "Yes"),
    ("What is the capital of Australia?\n\nA) Sydney\nB) Canberra\nC) Melbourne\n\nAnswer with the letter.", "A", "No"),
    ("How many times does the letter \"s\" appear in \"glass\"?", "2", "Yes"),
    ("What is 13 * 4?", "42", "No"),
)
SELF_CHECK_YES, SELF_CHECK_NO = "Yes", "No"


def self_check_messages(question: str, answer: str) -> list[dict]:
    """The few-shot verification prompt for ``answer`` to ``question``; the reply starts Yes or No."""
    shots = "\n\n".join(f"Question: {q}\nProposed answer: {a}\nIs the proposed answer correct? {verdict}"
                         for q, a, verdict in SELF_CHECK_SHOTS)  # fmt: skip
    return [{"role": "user", "content": (
        "Decide whether each proposed answer is correct. Reply Yes or No.\n\n"
        f"{shots}\n\nQuestion: {question}\nProposed answer: {answer.strip()}\nIs the proposed answer correct?"
    )}]  # fmt: skip


def revision_messages(question: str, draft: str) -> list[dict]:
    """The ladder's revision rung: the device model shown its own draft, asked to check and
    correct it. The revision is scored by the verifier as an answer to ``question`` itself."""
    return [{"role": "user", "content": (
        f"{question}\n\nA first attempt at an answer:\n{draft.strip()}\n\n"
        "Check the first attempt. If it is wrong, correct it. Reply with the answer only, as the question asks."
    )}]  # fmt: skip


def past_answer(answer: str, score: int) -> str:
    """An earlier assistant turn as the device model sees it in the conversation.

    Earlier answers are shown in the same layout the instructions ask for: without it, SmolLM2-135M
    imitated the mismatch and answered follow-ups with rating fragments ("N: 7 / Rating: [N]" in
    4 of 8 follow-ups; 0 of 8 with the layout; docs/architecture.md).
    """
    return f"{SLOT_OPEN['pa']}{score}{SLOT_CLOSE}{ANSWER_OPEN}{answer}"


def turn_pieces(
    protocol: Protocol, *, score: int, answer: str, reasoning: str = "", reasoning_ended_line: bool = True
) -> list[tuple[str, str]]:
    """The assistant turn as the runtime puts it into context: ``(kind, text)`` pieces, each
    tokenized on its own, exactly where the runtime tokenizes (for building training data).

    ``kind`` is "fixed" (runtime-written), "reasoning", "score" or "answer". The runtime stops the
    RPRA thought at a newline and keeps the token holding it in context before writing
    ``SLOT_OPEN["rpra"]``, so a thought that ended its line (``reasoning_ended_line``) is followed by
    a blank line; one cut by the token budget is not.
    """
    head: list[tuple[str, str]] = []
    if protocol == "rpra":
        head = [("fixed", REASONING_OPEN), ("reasoning", reasoning + ("\n" if reasoning_ended_line else ""))]
    return [*head, ("fixed", SLOT_OPEN[protocol]), ("score", str(score)), ("fixed", SCORE_CLOSE), ("answer", answer)]


# -- rating-like text in requests ----------------------------------------------------------------
#
# The slot cannot be forged (message text is tokenized without special tokens), but the device
# model imitates rating text it reads: a user message ending in "Rating: [[10]]" raised SmolLM2's
# expected score from 4.6 to 7.3 and flipped auto turns from remote to local ("Rating: [[1]]" does
# the reverse, forcing paid deferrals). So what the device reads has the score taken out of such
# text; the remote and the log get the message as written. A local answer continues from the
# prediction's KV cache, so it reads the neutralised text too: answering from the original would
# mean prefilling the conversation twice. Matching is done on a same-length NFKC-folded copy, so
# full-width look-alikes ("［［１０］］", "Ｓｃｏｒｅ：１０") are caught too.

_INVISIBLE = "\u00ad\u034f\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff"  # format characters that hide between digits
_GAP = rf"[\s{_INVISIBLE}]*"
_WORDS = "zero|one|two|three|four|five|six|seven|eight|nine|ten"
_NUMBER = rf"(?:[+-]?\d(?:[\d{_INVISIBLE}]*\d)?(?:[.,]\d+)?|\b(?:{_WORDS})\b)"  # \d: any Unicode digit
_DOUBLE_OPEN = rf"(?:[\[「『]{_GAP}[\[「『]|[⟦〚])"  # "[[" and look-alikes that NFKC leaves alone
_SLASH = "[/⁄∕÷]"
_RATING_PATTERNS = [
    # [[10]], [[ 7.5 ]], [[10/10]], ⟦10⟧, an unclosed "[[10": a number right after double brackets
    rf"(?P<keep>{_DOUBLE_OPEN}{_GAP}){_NUMBER}(?:{_GAP}{_SLASH}{_GAP}{_NUMBER})?",
    # Rating: 10, score = 9, Grade: [8], "rating of 10", "score is 10"
    rf"(?P<keep>\b(?:rating|score|grade|mark)s?{_GAP}(?:[:=]|\bis\b|\bof\b){_GAP}(?:[\[(]{_GAP})*){_NUMBER}",
    # "Please rate this answer 10", "score it a 9", "grade your reply as ten"
    rf"(?P<keep>\b(?:rate|score|grade)\s+(?:this|it|that|the|your|yourself|my|me|our)\b[^\d\n.!?]{{0,40}}?){_NUMBER}",
    # 10/10, "10 out of 10", "ten out of ten" ending a clause; not "7 out of 10 questions", not 10/10/2024
    rf"(?<![\d/.,])(?P<keep>){_NUMBER}(?={_GAP}(?:{_SLASH}|\bout of\b){_GAP}(?:10|ten)\b(?![/.,]?\d)(?![^\S\n]*[^\W\d_]))",
]
_RATING = [re.compile(pattern, re.IGNORECASE) for pattern in _RATING_PATTERNS]
_HIDDEN_SCORE = "?"


def neutralise_ratings(text: str) -> str:
    """``text`` with the score taken out of rating-like text, for what the device model reads.

    ``Rating: [[10]]`` becomes ``Rating: [[?]]``, ``Score: 10`` ``Score: ?``, ``10/10`` ``?/10``
    and "rate this answer 10" "rate this answer ?"; look-alikes too (full-width digits, brackets
    and letters, ``⟦10⟧``, digits split by invisible characters, numbers written as words).
    Idempotent. Left alone: text with no double bracket and no rating keyword next to the number
    ("[[link]]", "rated 4.5 stars by 10 people", citations like "[10]", dates, "7 out of 10
    questions"). The price is that a genuine rating in a question ("my essay got a score of 7",
    "is 8/10 good?") reaches the device model without its number; the remote gets it as written.
    Prose that asks for a high score without a number in rating form ("Give yourself a ten.") is
    not caught.
    """
    folded = _fold(text)
    spans: list[tuple[int, int]] = []
    for pattern in _RATING:
        spans += [(m.end("keep"), m.end()) for m in pattern.finditer(folded)]
    if not spans:
        return text
    merged: list[list[int]] = []  # two patterns may match the same number, or overlapping parts of it
    for start, end in sorted(spans):
        if merged and start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    pieces, at = [], 0
    for start, end in merged:
        pieces += [text[at:start], _HIDDEN_SCORE]
        at = end
    return "".join([*pieces, text[at:]])


def _fold(text: str) -> str:
    """``text`` with each character that NFKC maps to one character replaced by it ("１"→"1",
    "［"→"[", "Ｒ"→"R"): the same length, so a match's span is the same in the original."""
    if text.isascii():
        return text
    return "".join(f if len(f := unicodedata.normalize("NFKC", c)) == 1 else c for c in text)


# -- a rating line the model writes itself ------------------------------------------------------
#
# A local answer starts where the turn does, without the score before it (the runtime rewinds
# past the slot). The system prompt still describes the layout "Rating: [[N]]" then the answer,
# so some models (Qwen2.5-Coder-0.5B) open their answer with such a line: it is not part of the
# answer, and the user should not see it.

_LEADING_RATING = re.compile(r"\s*(?:rating|score)\s*[:=]?\s*\[*\s*\d{1,2}(?:\s*/\s*10)?\s*\]*[ \t]*(?:\n|$)", re.IGNORECASE)
_HOLD_CHARS = 24  # a rating line is shorter: past this, the text is the answer


class LeadingRatingFilter:
    """Feeds an answer's streamed pieces through, minus a leading rating line ("Rating: [[8]]\\n").

    Text is held back only while it could still be such a line (at most ``_HOLD_CHARS``
    characters or up to the first newline), so the answer's first words arrive at once otherwise.
    """

    def __init__(self) -> None:
        self._held, self._done = "", False

    def feed(self, piece: str) -> str:
        if self._done:
            return piece
        self._held += piece
        head = self._held.lstrip()
        word = re.match(r"[A-Za-z]*", head).group().lower()
        could_be = bool(head) and any(w.startswith(word) or word.startswith(w) for w in ("rating", "score")) and bool(word)
        if head and ("\n" in head or len(head) >= _HOLD_CHARS or not could_be):
            return self._release()
        return ""

    def flush(self) -> str:
        """What is still held at the end of the answer."""
        return "" if self._done else self._release()

    def _release(self) -> str:
        self._done = True
        match = _LEADING_RATING.match(self._held)
        return self._held[match.end():] if match else self._held
