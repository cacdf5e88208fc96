"""Report cards: progressive writing (PRESS), the word budget, versioned files."""

import pytest

from rpra.benchmarks.report_cards import build_card, format_stats, latest_card, limit_words, save_card, topic_stats


def record(i, score, category="arithmetic", suite="arithmetic", exact=None):
    return {"id": str(i), "suite": suite, "category": category, "prompt": f"What is {i} + {i}?",
            "local_answer": str(3 * i), "reference": str(2 * i), "judge_local": {"score": score}, "exact_local": exact}  # fmt: skip


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
    assert card.startswith("Arithmetic: weak at sums; fine with small numbers.\n\nMeasured on 5 judged answers:")
    assert history == ["Arithmetic: weak at sums.", "Arithmetic: weak at sums; fine with small numbers."]
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


def test_topic_statistics_are_counted_by_suite_and_by_large_enough_category():
    records = [record(i, score, category="level-1", exact=exact) for i, (score, exact) in enumerate([(8.0, 1.0), (6.0, 0.0), (7.0, 0.0)])]
    records += [record(10, 3.0, category="level-2", exact=0.0), record(11, None, category="level-2")]  # unjudged: left out
    records += [record(20, 5.0, category=None, suite="mtbench")]  # no answer key
    rows = topic_stats(records, pass_mark=7, min_items=3)
    assert rows == [  # passed: the answer key's verdict where there is one, over the judge
        {"topic": "arithmetic", "level": 0, "n": 4, "passed": 1, "judged": 4, "mean": 6.0, "scored": 2, "checked": 4, "correct": 1, "modal": "great"},
        {"topic": "level-1", "level": 1, "n": 3, "passed": 1, "judged": 3, "mean": 7.0, "scored": 2, "checked": 3, "correct": 1, "modal": "great"},
        {"topic": "mtbench", "level": 0, "n": 1, "passed": 0, "judged": 1, "mean": 5.0, "scored": 0, "checked": 0, "correct": 0, "modal": "ok"},
    ]  # level-2 has 1 judged record, under min_items; modal: the judge's bad / ok / great
    assert format_stats(rows).splitlines() == [
        "- arithmetic: 4 answers, mean score 6.0/10, 2 scored 7+, 1 of 4 correct; mostly great",
        "  - level-1: 3 answers, mean score 7.0/10, 2 scored 7+, 1 of 3 correct; mostly great",
        "- mtbench: 1 answer, mean score 5.0/10, 0 scored 7+; mostly ok",
    ]


def test_the_writer_sees_the_statistics_of_all_evidence_so_far_and_the_card_ends_with_them():
    writer = Writer(["Sums: often wrong.", "Sums: usually wrong."])
    records = [record(0, 8.0, exact=1.0), record(1, 2.0, exact=0.0), record(2, 3.0, exact=0.0)]
    card, _ = build_card(records, writer, batch_size=2, pass_mark=7)
    assert "- arithmetic: 2 answers, mean score 5.0/10, 1 scored 7+, 1 of 2 correct; mixed" in writer.prompts[0]
    assert "- arithmetic: 3 answers, mean score 4.3/10, 1 scored 7+, 1 of 3 correct; mostly bad" in writer.prompts[1]
    assert card.endswith("Measured on 3 judged answers:\n- arithmetic: 3 answers, mean score 4.3/10, 1 scored 7+, 1 of 3 correct; mostly bad")


def test_a_statistics_block_the_writer_copies_into_its_card_is_dropped():
    from rpra.benchmarks.report_cards import STATS_HEADER

    writer = Writer([f"Sums: often wrong.\n\n{STATS_HEADER}\n- arithmetic: 1 answer, mean score 8.0/10"])
    card, history = build_card([record(0, 8.0), record(1, 2.0)], writer, batch_size=2)
    assert history == ["Sums: often wrong."] and card.count("arithmetic:") == 1 and STATS_HEADER not in card


def verified(i, passed, suite="arithmetic", category="level-1"):
    """A record collected with --verified: an answer key's verdict, no judge."""
    return {"id": str(i), "suite": suite, "category": category, "prompt": f"What is {i} + {i}?", "local_answer": str(2 * i if passed else 3 * i),
            "judge_local": None, "exact_local": float(passed), "label": {"pass": passed, "source": "verified", "level": None}}  # fmt: skip


def test_verified_records_need_no_judge_and_count_as_their_label_says():
    records = [verified(i, i < 3) for i in range(4)] + [verified(10 + i, False, suite="mmlu", category=None) for i in range(3)]
    records[0]["label"]["pass"] = False  # right in one option order only: the label says fail
    writer = Writer(["Arithmetic: about half right. MMLU: weak."])
    card, _ = build_card(records, writer, batch_size=10)
    assert "Answer key says: incorrect" in writer.prompts[0] and "Judge's score" not in writer.prompts[0]
    assert card.endswith("Measured on 7 verified answers:\n- arithmetic: 4 answers, 2 correct (50%); mixed\n"
                         "- mmlu: 3 answers, 0 correct (0%); mostly incorrect")  # fmt: skip


def test_a_card_that_contradicts_its_numbers_is_sent_back_and_what_stays_wrong_is_cut():
    from rpra.benchmarks.report_cards import contradictions

    rows = topic_stats([verified(i, False, suite="commonsenseqa", category=None) for i in range(5)]
                       + [verified(10 + i, True) for i in range(5)])  # fmt: skip
    assert contradictions("Commonsense questions: strong and accurate.", rows)  # 0 of 5 pass
    assert contradictions("Arithmetic: weak, often wrong.", rows)  # 5 of 5 pass
    assert not contradictions("Commonsense questions: usually wrong. Arithmetic: reliable.", rows)
    assert not contradictions("Commonsense: good at some, wrong at most.", rows)  # praises and faults: left alone
    records = [verified(i, False, suite="commonsenseqa", category=None) for i in range(5)]
    writer = Writer(["Commonsense: strong and accurate. Answers briefly.", "Commonsense: excellent. Answers briefly."])
    notes: list[str] = []
    card, history = build_card(records, writer, batch_size=10, log=notes.append)
    assert "contradicts the measured numbers" in writer.prompts[1] and "0 of 5 commonsenseqa answers pass" in writer.prompts[1]
    assert history == ["Answers briefly."] and notes == ["update 1: 1 statement(s) contradicted the numbers; 1 left after the rewrite, cut"]


class Overflowing(Writer):
    """A writer with a small context: a prompt with more than ``limit`` examples is an HTTP 400."""

    def __init__(self, replies, limit):
        super().__init__(replies)
        self.limit = limit

    def complete(self, messages, *, max_tokens=None, temperature=None):
        from rpra.errors import RemoteError

        if messages[0]["content"].count("- Topic:") > self.limit:
            raise RemoteError("Remote http://w/v1/chat/completions answered HTTP 400: maximum context length is 4096 tokens")
        return super().complete(messages, max_tokens=max_tokens, temperature=temperature)


def test_a_batch_too_long_for_the_writer_is_halved_and_a_rerun_replays_the_finished_updates(tmp_path):
    from rpra.benchmarks.cache import CallCache
    from rpra.errors import RemoteError

    records = [verified(i, i % 2 == 0) for i in range(8)]
    cache = CallCache(tmp_path / "calls.sqlite")
    writer = Overflowing(["card 1", "card 2", "card 3"], limit=2)
    with pytest.raises(IndexError):  # the writer fails on the 4th update (no reply left): the run stops there
        build_card(records, writer, batch_size=8, cache=cache, writer_id="w")
    assert [p.count("- Topic:") for p in writer.prompts] == [2, 2, 2, 2]  # 8 -> 4 -> 2 examples per update; the 4th call failed
    again = Overflowing(["card 4"], limit=2)
    card, history = build_card(records, again, batch_size=8, cache=cache, writer_id="w")
    assert history == ["card 1", "card 2", "card 3", "card 4"] and len(again.prompts) == 1  # only the unfinished update called
    with pytest.raises(RemoteError, match="HTTP 400"):
        build_card(records[:1], Overflowing(["x"], limit=0), batch_size=4)  # one example still too long: the error stands


def test_a_journal_carries_the_finished_writer_calls_to_a_machine_with_an_empty_cache(tmp_path):
    from rpra.benchmarks.cache import CallCache, Journal

    records = [verified(i, i % 2 == 0) for i in range(6)]
    path = tmp_path / "results" / "card-writer.jsonl.gz"
    here = Journal(CallCache(tmp_path / "here.sqlite"), path)
    with pytest.raises(IndexError):  # stopped after two of three updates
        build_card(records, Writer(["card 1", "card 2"]), batch_size=2, cache=here, writer_id="w")
    (tmp_path / "here.sqlite").unlink()  # the machine is gone; the committed file is all that is left
    with open(path, "ab") as f:
        f.write(b"\x1f\x8b\x08\x00torn")  # and a hard kill tore a last member: that call only is lost

    there = Journal(CallCache(tmp_path / "there.sqlite"), path)
    assert there.loaded == 2
    writer = Writer(["card 3"])
    card, history = build_card(records, writer, batch_size=2, cache=there, writer_id="w")
    assert history == ["card 1", "card 2", "card 3"] and len(writer.prompts) == 1  # only the third update is made again
    assert Journal(CallCache(tmp_path / "later.sqlite"), path).loaded == 3  # the torn tail was cut, so the third call is readable


def test_a_read_only_journal_replays_but_writes_nothing(tmp_path):
    from rpra.benchmarks.cache import CallCache, Journal

    path = tmp_path / "calls.jsonl.gz"
    Journal(CallCache(tmp_path / "a.sqlite"), path).put("k", {"text": "kept"})
    reader = Journal(CallCache(tmp_path / "b.sqlite"), path, write=False)
    size = path.stat().st_size
    reader.put("k2", {"text": "only cached"})
    assert reader.get("k") == {"text": "kept"} and reader.get("k2") == {"text": "only cached"}
    assert path.stat().st_size == size and Journal(CallCache(tmp_path / "c.sqlite"), path).loaded == 1


def test_a_file_that_is_no_journal_is_refused_and_left_as_it_was(tmp_path):
    from rpra.benchmarks.cache import CallCache, Journal
    from rpra.errors import RpraError

    path = tmp_path / "calls.jsonl.gz"
    path.write_text("not a journal, but somebody's notes: keep them\n" * 3)
    before = path.read_bytes()
    with pytest.raises(RpraError, match="not a journal"):
        Journal(CallCache(tmp_path / "a.sqlite"), path)
    assert path.read_bytes() == before
    path.write_bytes(b"\x1f\x8b\x08\x00" + b"a hard kill in the first call" * 3)  # a journal torn inside its first member
    assert Journal(CallCache(tmp_path / "b.sqlite"), path).loaded == 0 and path.read_bytes() == b""  # is a journal with no call yet


def test_the_journal_lives_beside_the_committed_collections_and_tests_read_none(tmp_path, monkeypatch):
    from rpra.benchmarks.collection import SEEDS
    from rpra.benchmarks.report_cards import journal_path

    assert journal_path("qwen2.5-coder-0.5b-instruct") is None  # RPRA_SEEDS="" (conftest): nothing committed is read
    monkeypatch.setenv("RPRA_SEEDS", str(tmp_path / "results" / "collections"))
    assert journal_path("/models/My Model.gguf") == tmp_path / "results" / "calls" / "card-writer--My_Model.jsonl.gz"
    monkeypatch.delenv("RPRA_SEEDS")
    assert journal_path("qwen2.5-coder-0.5b-instruct") == SEEDS.parent / "calls" / "card-writer--qwen2.5-coder-0.5b-instruct.jsonl.gz"
