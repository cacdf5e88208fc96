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
