"""Report cards: progressive writing (PRESS), the word budget, versioned files."""

import pytest

from benchmarks.report_cards import build_card, latest_card, limit_words, save_card


def record(i, score, category="arithmetic"):
    return {"id": str(i), "suite": "arithmetic", "category": category, "prompt": f"What is {i} + {i}?",
            "local_answer": str(3 * i), "reference": str(2 * i), "judge_local": {"score": score}}  # fmt: skip


class Writer:
    """A fake writer that records what it was shown (the real one is a RemoteModel)."""

    def __init__(self, replies):
        self.replies, self.prompts = list(replies), []

    def complete(self, messages, *, max_tokens=None, temperature=None):
        self.prompts.append(messages[0]["content"])
        return self.replies.pop(0)


def test_the_card_is_rewritten_batch_by_batch_from_the_previous_card():
    writer = Writer(["Arithmetic: weak at sums.", "Arithmetic: weak at sums; fine with small numbers."])
    records = [record(i, 2.0) for i in range(5)]
    card, history = build_card(records, writer, batch_size=3)
    assert card == "Arithmetic: weak at sums; fine with small numbers." and len(history) == 2
    assert "(empty: no evidence yet)" in writer.prompts[0] and "What is 0 + 0?" in writer.prompts[0]
    # The second update sees the first card and only the new batch.
    assert "Arithmetic: weak at sums." in writer.prompts[1]
    assert "What is 3 + 3?" in writer.prompts[1] and "What is 0 + 0?" not in writer.prompts[1]
    assert "Reference answer: 6" in writer.prompts[1] and "Judge's score: 2.0/10" in writer.prompts[1]


def test_unjudged_records_are_left_out_and_no_evidence_is_an_error():
    writer = Writer(["card"])
    build_card([record(0, None), record(1, 9.0)], writer, batch_size=8)
    assert "What is 1 + 1?" in writer.prompts[0] and "What is 0 + 0?" not in writer.prompts[0]
    with pytest.raises(ValueError, match="rpra collect"):
        build_card([record(0, None)], Writer([]))


def test_an_overlong_card_is_cut_at_a_line_within_the_budget():
    text = "Topic A: " + "word " * 8 + "\nTopic B: " + "word " * 8
    cut = limit_words(text, 12)
    assert cut.startswith("Topic A") and "Topic B" not in cut and len(cut.split()) <= 12
    assert limit_words("short card", 12) == "short card"


def test_cards_are_versioned_and_the_latest_is_found(isolated_home):
    assert latest_card("smollm2-135m-instruct") is None
    first = save_card("v1 text", device_model="smollm2-135m-instruct", meta={"records": 8})
    second = save_card("v2 text", device_model="smollm2-135m-instruct", meta={"records": 16})
    assert (first.version, second.version) == (1, 2)
    latest = latest_card("smollm2-135m-instruct")
    assert latest.version == 2 and latest.text.strip() == "v2 text" and latest.meta["records"] == 16
    assert first.path.read_text().strip() == "v1 text"  # earlier versions are kept
