"""The LLM judge and the model-call cache.

Fast tests: the cache on a real SQLite file, score reading from hand-built OpenAI responses, and
the judge against real stub HTTP servers. Slow tests: the judge against a real llama.cpp server.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading

import pytest

from rpra.benchmarks.cache import CallCache, cached, key
from rpra.benchmarks.judge import (
    MT_BENCH_SINGLE_MATH_V1,
    MT_BENCH_SINGLE_V1,
    SINGLE,
    SINGLE_REFERENCE,
    Judge,
    Verdict,
    agreement,
    parse_rating,
    rating_grammar,
    verdict_from_response,
)
from rpra.errors import ConfigError, RemoteError, RpraError
from rpra.models import REGISTRY
from rpra.remote import RemoteModel

DEVICE_SHA256 = REGISTRY["smollm2-135m-instruct"].sha256


def fast(url: str, **options) -> RemoteModel:
    return RemoteModel(url, **{"timeout": 0.5, "connect_timeout": 0.5, "retries": 1, "backoff": 0.01, **options})


# -- the cache ------------------------------------------------------------------------------------


def test_key_is_sha256_of_canonical_json():
    canonical = '["judge","gguf:abc",{"a":1,"b":[1,"é"]}]'
    assert key("judge", "gguf:abc", {"b": [1, "é"], "a": 1}) == hashlib.sha256(canonical.encode()).hexdigest()


def test_key_ignores_dict_order_but_not_content():
    base = key("judge", "m", {"x": 1, "y": {"p": 0.0, "q": "t"}})
    assert base == key("judge", "m", {"y": {"q": "t", "p": 0.0}, "x": 1})
    assert len({base, key("answer", "m", {"x": 1, "y": {"p": 0.0, "q": "t"}}),
                key("judge", "m2", {"x": 1, "y": {"p": 0.0, "q": "t"}}),
                key("judge", "m", {"x": 2, "y": {"p": 0.0, "q": "t"}})}) == 4  # fmt: skip


def test_key_refuses_payloads_that_are_not_plain_json():
    with pytest.raises(ValueError, match="not plain JSON"):
        key("judge", "m", {"t": float("nan")})
    with pytest.raises(ValueError, match="not plain JSON"):
        key("judge", "m", {"t": object()})


def test_put_then_get_survives_reopening(tmp_path):
    path = tmp_path / "calls.sqlite"
    with CallCache(path) as cache:
        assert cache.get("k") is None
        cache.put("k", {"text": "hi", "n": [1, 2]})
    with CallCache(path) as cache:
        assert cache.get("k") == {"text": "hi", "n": [1, 2]}
        assert len(cache) == 1


def test_default_path_is_under_rpra_home(isolated_home):
    with CallCache() as cache, CallCache.default() as default:
        assert cache.path == default.path == isolated_home / "cache" / "calls.sqlite"


def test_only_json_objects_are_stored(tmp_path):
    with CallCache(tmp_path / "c.sqlite") as cache, pytest.raises(TypeError, match="dicts"):
        cache.put("k", ["not", "a", "dict"])


def test_cached_calls_once_then_hits(tmp_path):
    cache = CallCache(tmp_path / "c.sqlite")
    calls = []

    def fn():
        calls.append(1)
        return {"v": len(calls)}

    assert cached(cache, "judge", "m", {"q": 1}, fn) == {"v": 1}
    assert cached(cache, "judge", "m", {"q": 1}, fn) == {"v": 1}
    assert len(calls) == 1


def test_a_changed_model_misses(tmp_path):
    cache = CallCache(tmp_path / "c.sqlite")
    cached(cache, "judge", "sha-old", {"q": 1}, lambda: {"v": "old"})
    assert cached(cache, "judge", "sha-new", {"q": 1}, lambda: {"v": "new"}) == {"v": "new"}


def test_errors_are_not_cached(tmp_path):
    cache = CallCache(tmp_path / "c.sqlite")

    def fail():
        raise RemoteError("down")

    with pytest.raises(RemoteError):
        cached(cache, "judge", "m", {"q": 1}, fail)
    assert len(cache) == 0
    assert cached(cache, "judge", "m", {"q": 1}, lambda: {"v": 1}) == {"v": 1}


def test_without_a_cache_every_call_is_made():
    calls = []
    for _ in range(2):
        assert cached(None, "judge", "m", {}, lambda: calls.append(1) or {"v": 1}) == {"v": 1}
    assert len(calls) == 2


def test_concurrent_writers_and_readers_lose_nothing(tmp_path):
    path = tmp_path / "c.sqlite"
    shared = CallCache(path)
    errors = []

    def work(worker: int, own_connection: bool):
        # Half the workers share one connection (threads of one process), half open their own
        # (as separate processes would): both must take turns without "database is locked".
        cache = CallCache(path) if own_connection else shared
        try:
            for i in range(40):
                cache.put(f"{worker}-{i}", {"worker": worker, "i": i})
                assert cache.get(f"{worker}-{i}") == {"worker": worker, "i": i}
        except Exception as exc:  # collected and asserted below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w, w % 2 == 0)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(CallCache(path)) == 8 * 40


def test_a_damaged_cache_file_says_what_to_do(tmp_path):
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"this is not a database, just some text that is long enough" * 100)
    with pytest.raises(RpraError, match="delete it"):
        CallCache(path)


# -- reading scores from logprobs ---------------------------------------------------------------------


def response(tokens: list[tuple[str, dict[str, float]]], content: str | None = None) -> dict:
    """An OpenAI chat completion with logprobs. ``tokens``: (sampled token, {alternative: probability});
    the sampled token's probability is taken from the alternatives (1e-6 when absent)."""
    entries = [
        {
            "token": token,
            "logprob": math.log(top.get(token, 1e-6)),
            "bytes": None,
            "top_logprobs": [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in top.items()],
        }
        for token, top in tokens
    ]
    text = "".join(token for token, _ in tokens) if content is None else content
    return {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": {"content": entries},
                     "finish_reason": "stop"}],
    }  # fmt: skip


def text_response(content: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None}]}


def approx(distribution: dict[int, float], scale_max: int = 10) -> dict[int, float]:
    return pytest.approx({k: distribution.get(k, 0.0) for k in range(1, scale_max + 1)})


PREFIX = [("Rating", {"Rating": 0.9}), (":", {":": 0.9}), (" ", {" ": 0.5}), ("[", {"[": 0.5}), ("[", {"[": 0.5})]


def test_distribution_is_read_right_after_the_brackets_and_renormalised_over_scores():
    v = verdict_from_response(response([*PREFIX, ("7", {"7": 0.5, "8": 0.25, "N": 0.25}), ("]]", {"]]": 1.0})]))
    assert v.method == "logprobs"
    assert v.distribution == approx({7: 2 / 3, 8: 1 / 3})
    assert v.score == pytest.approx(7 + 1 / 3)
    assert v.raw == "Rating: [[7]]"


def test_a_sampled_1_is_split_into_1_and_10_by_the_next_token():
    # "1" then "0": P("1") = 0.6 is 10 with 0.75 and 1 with 0.25 (the "]]" share).
    v = verdict_from_response(response([*PREFIX, ("1", {"1": 0.6, "9": 0.2}), ("0", {"0": 0.75, "]]": 0.25}), ("]]", {"]]": 1.0})]))
    assert v.distribution == approx({10: 0.45 / 0.8, 1: 0.15 / 0.8, 9: 0.2 / 0.8})
    assert v.raw == "Rating: [[10]]"


def test_after_a_sampled_1_other_digits_and_decimals_are_invalid_and_dropped():
    # P("1") = 0.5: "]]" 0.4 -> 1, "0" 0.2 -> 10, "5" 0.2 (15) and "." 0.2 (1.x) -> dropped.
    v = verdict_from_response(
        response([*PREFIX, ("1", {"1": 0.5, "3": 0.5}), ("]]", {"]]": 0.4, "0": 0.2, "5": 0.2, ".": 0.2}), ("x", {})])
    )
    assert v.distribution == approx({1: 0.2 / 0.8, 10: 0.1 / 0.8, 3: 0.5 / 0.8})


def test_when_another_score_is_sampled_all_of_p1_goes_to_score_1():
    # The documented approximation: what follows "1" was never computed.
    v = verdict_from_response(response([*PREFIX, ("8", {"8": 0.6, "1": 0.3, "N": 0.1}), ("]]", {"]]": 1.0, "0": 0.5})]))
    assert v.distribution == approx({8: 2 / 3, 1: 1 / 3})


def test_a_single_token_10_counts_as_10():
    tokens = [("Rating", {"Rating": 1.0}), (":", {":": 1.0}), (" [[", {" [[": 1.0}),
              ("10", {"10": 0.7, "9": 0.2, "1": 0.1}), ("]]", {"]]": 1.0})]  # fmt: skip
    v = verdict_from_response(response(tokens))
    assert v.distribution == approx({10: 0.7, 9: 0.2, 1: 0.1})
    assert v.score == pytest.approx(7 + 1.8 + 0.1)


def test_scores_above_the_scale_are_not_scores():
    v = verdict_from_response(response([*PREFIX, ("4", {"4": 0.4, "11": 0.3, "7": 0.3}), ("]]", {"]]": 1.0})]), scale_max=5)
    assert v.distribution == approx({4: 1.0}, scale_max=5)
    assert set(v.distribution) == {1, 2, 3, 4, 5}


def test_a_forced_token_missing_from_the_alternatives_still_counts():
    # A grammar can force a token the model gave almost no weight (llama.cpp then leaves it out
    # of top_logprobs): the score distribution is that token alone.
    v = verdict_from_response(response([*PREFIX, ("3", {"N": 0.9, "R": 0.05}), ("]]", {"]]": 1.0})]))
    assert v.distribution == approx({3: 1.0})
    assert v.score == pytest.approx(3.0)


def test_the_first_brackets_holding_a_score_are_read():
    tokens = [("[[", {"[[": 1.0}), ("rating", {"rating": 1.0}), ("]]", {}), (" [[", {}), ("6", {"6": 0.5, "2": 0.5}), ("]]", {})]
    assert verdict_from_response(response(tokens)).distribution == approx({6: 0.5, 2: 0.5})


def test_logprobs_without_a_score_position_fall_back_to_the_text():
    v = verdict_from_response(response([("Rating", {}), (":", {}), (" 7", {" 7": 0.9, " 8": 0.1})]))
    assert (v.method, v.score, v.distribution) == ("parsed", 7.0, None)


def test_no_logprobs_means_the_rating_is_parsed_from_the_text():
    v = verdict_from_response(text_response("Rating: [[7]]\nThe answer is right."))
    assert (v.method, v.score, v.distribution) == ("parsed", 7.0, None)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Rating: [[7]]", 7),
        ("[[10]]", 10),
        ("[[ 4 ]] and later [[9]]", 4),
        ("**Rating:** [[3]]", 3),
        ("rating: 2", 2),
        ("Rating: 10.", 10),
        ("The answer is good.", None),
        ("[[11]]", None),
        ("[[0]]", None),
        ("Rating: 7.5", None),
        ("[[7.5]]", None),
        ("Rating: [[rating]]", None),
        ("", None),
    ],
)
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


def test_unparseable_output_is_recorded_as_such_never_as_a_number():
    v = verdict_from_response(text_response("The capital of France is Paris."), reference_guided=True)
    assert v == Verdict(None, None, "unparseable", "The capital of France is Paris.", reference_guided=True)
    assert v.unparseable


def test_a_score_outside_the_scale_is_unparseable():
    v = verdict_from_response(text_response("Rating: [[8]]"), scale_max=5)
    assert (v.method, v.score) == ("unparseable", None)


def test_verdict_round_trips_through_json():
    v = verdict_from_response(response([*PREFIX, ("7", {"7": 0.5, "8": 0.5}), ("]]", {})]), cached=True)
    data = json.loads(json.dumps(v.to_dict()))
    assert data == v.to_dict()
    assert Verdict.from_dict(data) == v


# -- prompts ----------------------------------------------------------------------------------------


def test_prompts_are_mt_bench_with_the_rating_asked_first():
    assert "[[rating]]" in MT_BENCH_SINGLE_V1 and "[[rating]]" in MT_BENCH_SINGLE_MATH_V1
    for ours, original in ((SINGLE, MT_BENCH_SINGLE_V1), (SINGLE_REFERENCE, MT_BENCH_SINGLE_MATH_V1)):
        assert "explanation" not in ours
        assert 'Reply with the rating alone, before anything else, strictly in this format: "Rating: [[rating]]"' in ours
        assert ours.startswith(original[: original.index("Your evaluation should")])
        assert ours.endswith(original[original.index("\n\n[Question]") :])


def test_the_reference_guided_prompt_is_used_iff_a_reference_is_given():
    judge = Judge(RemoteModel("http://127.0.0.1:1"), cache=None)
    plain = judge.messages("What is 17*23?", "341")
    guided = judge.messages("What is 17*23?", "341", reference="391")
    assert plain[0] == guided[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert "Reference Answer" not in plain[1]["content"]
    assert "[The Start of Reference Answer]\n391\n[The End of Reference Answer]" in guided[1]["content"]
    assert "on a scale of 1 to 10." in plain[1]["content"]
    assert "[Question]\nWhat is 17*23?" in guided[1]["content"]


def test_braces_in_the_question_are_sent_as_they_are():
    judge = Judge(RemoteModel("http://127.0.0.1:1"), cache=None)
    assert "Format {x} as JSON" in judge.messages("Format {x} as JSON", "{}")[1]["content"]


def test_a_blank_reference_is_refused():
    with pytest.raises(ValueError, match="reference=None"):
        Judge(RemoteModel("http://127.0.0.1:1"), cache=None).messages("q", "a", reference="  ")


@pytest.mark.parametrize("scale_max", [1, 11, 100])
def test_scales_beyond_one_digit_token_are_refused(scale_max):
    with pytest.raises(ConfigError, match="scale_max"):
        Judge(RemoteModel("http://127.0.0.1:1"), cache=None, scale_max=scale_max)


def test_the_grammar_allows_exactly_the_scale():
    assert rating_grammar(10) == 'root ::= "Rating: [[" ("10" | "9" | "8" | "7" | "6" | "5" | "4" | "3" | "2" | "1") "]]"'
    assert re.findall(r'"(\d+)"', rating_grammar(3)) == ["3", "2", "1"]


# -- the judge over real HTTP (stub servers) ----------------------------------------------------------------


def test_judge_asks_for_logprobs_at_temperature_0_and_parses_a_text_only_answer(serve, tmp_path):
    server = serve("ok_stream", deltas=("Rating: [[8]]",))
    v = Judge(fast(server.url, model="judge"), cache=CallCache(tmp_path / "c.sqlite")).score("q", "a", reference="r")
    assert (v.method, v.score, v.reference_guided, v.cached) == ("parsed", 8.0, True, False)
    (request,) = server.posts
    body = request.body
    assert (body["model"], body["stream"], body["temperature"], body["logprobs"], body["top_logprobs"]) == (
        "judge", False, 0.0, True, 20,
    )  # fmt: skip
    assert body["max_tokens"] <= 16
    assert "grammar" not in body


def test_judge_sends_the_grammar_only_when_asked(serve):
    server = serve("ok_stream", deltas=("Rating: [[8]]",))
    Judge(fast(server.url), cache=None, grammar=True, scale_max=9).score("q", "a")
    assert server.posts[0].body["grammar"] == rating_grammar(9)


def test_an_identical_call_is_served_from_the_cache(serve, tmp_path):
    server = serve("ok_stream", deltas=("Rating: [[8]]",))
    judge = Judge(fast(server.url), cache=CallCache(tmp_path / "c.sqlite"))
    first, second = judge.score("q", "a"), judge.score("q", "a")
    assert len(server.posts) == 1
    assert (first.cached, second.cached) == (False, True)
    assert second == Verdict(**{**first.to_dict(), "cached": True})
    judge.score("q", "another answer")
    assert len(server.posts) == 2


def test_an_unparseable_answer_is_cached_as_the_result_it_is(serve, tmp_path):
    server = serve("ok_stream", deltas=("I cannot rate this.",))
    judge = Judge(fast(server.url), cache=CallCache(tmp_path / "c.sqlite"))
    assert judge.score("q", "a").unparseable and judge.score("q", "a").unparseable
    assert len(server.posts) == 1


@pytest.mark.parametrize("behaviour", ["garbage", "status_500"])
def test_a_misbehaving_endpoint_is_a_remote_error_and_is_not_cached(serve, tmp_path, behaviour):
    server = serve(behaviour)
    cache = CallCache(tmp_path / "c.sqlite")
    with pytest.raises(RemoteError, match=re.escape(server.url)):
        Judge(fast(server.url), cache=cache).score("q", "a")
    assert len(cache) == 0


class CannedRemote(RemoteModel):
    """A RemoteModel whose one response is given: for shapes no stub server sends."""

    def __init__(self, canned: dict):
        super().__init__("http://127.0.0.1:1")
        self.canned = canned

    def chat_completion(self, messages, **options) -> dict:
        return self.canned


def test_malformed_logprobs_are_a_remote_error_and_are_not_cached(tmp_path):
    canned = text_response("Rating: [[5]]")
    canned["choices"][0]["logprobs"] = {"content": [{"token": "R", "logprob": "very likely"}]}
    cache = CallCache(tmp_path / "c.sqlite")
    with pytest.raises(RemoteError, match="malformed logprobs"):
        Judge(CannedRemote(canned), cache=cache).score("q", "a")
    assert len(cache) == 0


def test_the_cache_key_covers_model_id_and_request(tmp_path):
    cache = CallCache(tmp_path / "c.sqlite")
    remote = CannedRemote(text_response("Rating: [[5]]"))
    Judge(remote, cache=cache, model_id="sha-a").score("q", "a")
    assert Judge(remote, cache=cache, model_id="sha-a").score("q", "a").cached
    assert not Judge(remote, cache=cache, model_id="sha-b").score("q", "a").cached
    assert not Judge(remote, cache=cache, model_id="sha-a").score("q", "a", reference="r").cached
    assert not Judge(remote, cache=cache, model_id="sha-a", grammar=True).score("q", "a").cached
    assert not Judge(remote, cache=cache, model_id="sha-a", scale_max=5).score("q", "a").cached
    assert len(cache) == 5


def test_chat_completion_refuses_extra_fields_that_the_client_owns():
    with pytest.raises(ValueError, match="stream"):
        RemoteModel("http://127.0.0.1:1").chat_completion([], extra={"stream": True})


# -- agreement with exact verifiers ---------------------------------------------------------------------


def test_agreement_hand_case():
    # judge:  8 pass, 3 fail, 7 pass, 9 pass, None, 2 fail ; exact: 1, 0, 0, 1, 1, 1.0
    result = agreement([8, 3, 7, 9, None, 2.5], [1.0, 0.0, 0.0, 1.0, 1.0, 1.0], pass_mark=7)
    assert result["n"] == 5 and result["unparseable"] == 1
    assert (result["both_pass"], result["both_fail"], result["judge_pass_exact_fail"], result["judge_fail_exact_pass"]) == (2, 1, 1, 1)
    assert result["accuracy"] == pytest.approx(3 / 5)
    # p_judge = 3/5, p_exact = 3/5, chance = 0.36 + 0.16 = 0.52, kappa = (0.6 - 0.52) / 0.48
    assert result["kappa"] == pytest.approx(0.08 / 0.48)


def test_perfect_agreement_has_kappa_1_and_inverted_has_kappa_minus_1():
    exact = [1.0, 0.0, 1.0, 0.0]
    assert agreement([9, 2, 7, 6.99], exact, 7)["kappa"] == pytest.approx(1.0)
    assert agreement([2, 9, 2, 9], exact, 7)["kappa"] == pytest.approx(-1.0)


def test_partial_credit_is_a_fail():
    assert agreement([3.0], [0.5], 7)["both_fail"] == 1


def test_kappa_is_undefined_when_both_sides_are_constant_and_equal():
    result = agreement([8, 9], [1.0, 1.0], 7)
    assert (result["accuracy"], result["kappa"]) == (1.0, None)


def test_agreement_with_nothing_to_pair():
    result = agreement([None, None], [1.0, 0.0], 7)
    assert (result["n"], result["unparseable"], result["accuracy"], result["kappa"]) == (0, 2, None, None)


def test_agreement_refuses_unpaired_or_out_of_range_input():
    with pytest.raises(ValueError, match="one to one"):
        agreement([1, 2], [1.0], 7)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        agreement([8], [7.0], 7)


# -- the judge against a real llama.cpp server ---------------------------------------------------------


@pytest.mark.slow
def test_llama_cpp_server_sends_logprobs_only_when_top_logprobs_is_asked(remote_server):
    remote = RemoteModel(remote_server.url, model="stand-in")
    messages = [{"role": "user", "content": "Say hi."}]
    without = remote.chat_completion(messages, max_tokens=2, temperature=0.0, extra={"logprobs": True})
    assert without["choices"][0]["logprobs"] is None
    with_top = remote.chat_completion(messages, max_tokens=2, temperature=0.0, extra={"logprobs": True, "top_logprobs": 5})
    (first, *_) = with_top["choices"][0]["logprobs"]["content"]
    assert isinstance(first["token"], str) and len(first["top_logprobs"]) == 5


@pytest.mark.slow
def test_real_judge_reads_the_score_from_logprobs(remote_server, tmp_path):
    judge = Judge(
        RemoteModel(remote_server.url, model="stand-in"), cache=CallCache(tmp_path / "c.sqlite"),
        model_id=DEVICE_SHA256, grammar=True,
    )  # fmt: skip
    v = judge.score("What is 17*23?", "17*23 = 391.", reference="391")
    assert v.method == "logprobs"
    assert re.fullmatch(r"Rating: \[\[(10|[1-9])\]\]", v.raw)
    assert 1.0 <= v.score <= 10.0
    assert sum(v.distribution.values()) == pytest.approx(1.0)
    assert v.score == pytest.approx(sum(k * p for k, p in v.distribution.items()))
    sampled = int(v.raw[len("Rating: [[") : -2])
    assert v.distribution[sampled] > 0


@pytest.mark.slow
def test_real_judge_without_grammar_never_invents_a_number(remote_server):
    # SmolLM2-135M ignores the format when not forced (it answers the question instead); whatever
    # it writes, the verdict is a score on the scale or honestly unparseable.
    v = Judge(RemoteModel(remote_server.url, model="stand-in"), cache=None).score("What is 17*23?", "391")
    if v.method == "unparseable":
        assert v.score is None and v.distribution is None
    else:
        assert 1.0 <= v.score <= 10.0


@pytest.mark.slow
def test_real_second_call_is_served_from_the_cache_without_any_request(remote_server, serve, tmp_path):
    cache = CallCache(tmp_path / "c.sqlite")
    args = dict(cache=cache, model_id=DEVICE_SHA256, grammar=True)
    first = Judge(RemoteModel(remote_server.url, model="stand-in"), **args).score("Capital of France?", "Paris.")
    # The same model (same content id), now behind an endpoint that would fail every request.
    dead = serve("status_500")
    second = Judge(fast(dead.url, model="stand-in"), **args).score("Capital of France?", "Paris.")
    assert dead.requests == []
    assert (first.cached, second.cached) == (False, True)
    assert (second.score, second.distribution, second.raw) == (first.score, first.distribution, first.raw)


def test_the_default_model_id_is_the_endpoint_and_model_name():
    judge = Judge(RemoteModel("http://judge.example:8000", model="big"), cache=None)
    assert judge.model_id == "http://judge.example:8000/v1|big"
