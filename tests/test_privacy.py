import json

import pytest

from rpra.errors import ConfigError, RpraError
from rpra.privacy import Redactor, StreamRestorer, Vault, redact_messages
from rpra.remote import RemoteModel
from rpra.runtime import Runtime

US = Redactor(phone_region="US")


def redact(text: str, redactor: Redactor = US) -> tuple[str, Vault]:
    vault = Vault()
    return redactor.redact(text, vault), vault


def kinds(vault: Vault) -> list[str]:
    return [e["kind"] for e in vault.entries]


def test_masks_an_email_address():
    out, vault = redact("Write to Bob.Smith+news@mail.example.co.uk. Thanks")
    assert out == "Write to [EMAIL_1]. Thanks"
    assert vault.entries == [{"kind": "email", "placeholder": "[EMAIL_1]"}]


def test_masks_international_and_national_phone_numbers():
    out, vault = redact("Call +44 20 7946 0958 or (415) 555-2671 today.")
    assert out == "Call [PHONE_1] or [PHONE_2] today."
    assert kinds(vault) == ["phone", "phone"]


def test_national_format_follows_the_phone_region():
    text = "Ring 020 7946 0958 please"
    assert redact(text, Redactor(phone_region="gb"))[0] == "Ring [PHONE_1] please"
    assert redact(text, US)[0] == text  # not a valid US number


def test_unknown_phone_region_says_what_to_set():
    with pytest.raises(ConfigError, match="two-letter ISO 3166") as e:
        Redactor(phone_region="XX")
    assert isinstance(e.value, RpraError)


@pytest.mark.parametrize("card", ["4111 1111 1111 1111", "4111-1111-1111-1111", "5555555555554444", "3782 822463 10005"])
def test_masks_a_luhn_valid_card_number(card):
    assert redact(f"My card is {card}, expiry 12/29")[0] == "My card is [CARD_1], expiry 12/29"


def test_leaves_a_luhn_invalid_card_number():
    text = "Tracking 4111 1111 1111 1112 and 4111111111111112"
    out, vault = redact(text)
    assert out == text and len(vault) == 0


def test_finds_the_card_after_a_year_in_the_same_run_of_digits():
    assert redact("order 2024 4111 1111 1111 1111 shipped")[0] == "order 2024 [CARD_1] shipped"


def test_masks_an_iban_and_not_the_word_after_it():
    out, vault = redact("Pay GB82 WEST 1234 5698 7654 32 ASAP, or DE89370400440532013000.")
    assert out == "Pay [IBAN_1] ASAP, or [IBAN_2]."
    assert kinds(vault) == ["iban", "iban"]


def test_leaves_an_iban_with_a_bad_check_digit():
    text = "Pay GB83 WEST 1234 5698 7654 32"
    assert redact(text)[0] == text


def test_masks_a_us_social_security_number():
    assert redact("SSN 123-45-6789 on file")[0] == "SSN [SSN_1] on file"
    assert redact("SSN 000-45-6789 on file")[0] == "SSN 000-45-6789 on file"  # area 000 is never issued


def test_masks_ipv4_and_ipv6_addresses():
    out, vault = redact("Server 192.168.1.10 and 2001:db8:85a3::8a2e:370:7334 are down.")
    assert out == "Server [IP_1] and [IP_2] are down."
    assert kinds(vault) == ["ip", "ip"]


def test_leaves_numbers_that_are_not_addresses():
    text = "999.1.1.1, v1.2.3.4, 1.2.3.4.5, 10:30:45 and std::abc"
    assert redact(text)[0] == text


def test_four_part_version_number_is_masked_as_an_address():
    # A documented trade-off: "1.2.3.4" is a valid IPv4 address and cannot be told apart.
    assert redact("upgrade to 1.2.3.4")[0] == "upgrade to [IP_1]"


@pytest.mark.parametrize(
    "text",
    ["In 2024 it cost $19.99.", "Compute 12345 * 678 = 8369910", "Due 2024-01-15 at 12:30", "Pi is 3.14159265358979323"],
)
def test_leaves_ordinary_numbers(text):
    out, vault = redact(text)
    assert out == text and len(vault) == 0


def test_ipv6_with_an_ipv4_tail_is_one_address():
    out, vault = redact("mapped ::ffff:192.0.2.1 here")
    assert out == "mapped [IP_1] here" and len(vault) == 1


def test_a_phone_number_that_passes_luhn_is_masked_once_as_a_phone():
    # "4915123456720" is Luhn-valid, but written with "+" the longer phone span wins the overlap.
    out, vault = redact("call +4915123456720 now")
    assert out == "call [PHONE_1] now" and kinds(vault) == ["phone"]


def test_same_value_gets_the_same_placeholder_across_messages():
    messages = [
        {"role": "user", "content": "I am ann@example.com"},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Email ann@example.com and bo@example.org"},
    ]
    sent, vault = redact_messages(messages, US)
    assert [m["content"] for m in sent] == ["I am [EMAIL_1]", "Noted.", "Email [EMAIL_1] and [EMAIL_2]"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert messages[0]["content"] == "I am ann@example.com"  # the input is not modified
    assert len(vault) == 2


def test_round_trip_restores_the_original_text_exactly():
    text = "Ann (ann@example.com, +1 415-555-2671) paid with 4111 1111 1111 1111 from 10.0.0.7; ANN@example.com too."
    out, vault = redact(text)
    assert "ann@example.com" not in out and "4111" not in out and "10.0.0.7" not in out
    assert vault.restore(out) == text


def test_restore_knows_only_the_exact_form():
    out, vault = redact("mail ann@example.com")
    assert vault.restore("[EMAIL_1] / [email_1] / EMAIL_1 / [EMAIL_2]") == "ann@example.com / [email_1] / EMAIL_1 / [EMAIL_2]"


def test_literal_placeholder_in_the_input_survives_the_round_trip():
    text = "The template says [EMAIL_1]; mine is ann@example.com"
    out, vault = redact(text)
    assert out == "The template says [EMAIL_1]; mine is [EMAIL_2]"
    assert vault.restore(out) == text
    assert vault.restore("Reply to [EMAIL_2], not [EMAIL_1]") == "Reply to ann@example.com, not [EMAIL_1]"


def test_literal_placeholder_in_an_earlier_message_is_never_issued():
    messages = [{"role": "user", "content": "ann@example.com"}, {"role": "user", "content": "what is [EMAIL_1]?"}]
    sent, vault = redact_messages(messages, US)
    assert sent[0]["content"] == "[EMAIL_2]" and sent[1]["content"] == "what is [EMAIL_1]?"
    assert [vault.restore(m["content"]) for m in sent] == [m["content"] for m in messages]


def test_literal_of_an_already_issued_placeholder_is_escaped():
    vault = Vault()
    first = US.redact("ann@example.com", vault)
    second = US.redact("did you mean [EMAIL_1]?", vault)  # typed after [EMAIL_1] was issued
    assert first == "[EMAIL_1]" and second == "did you mean [EMAIL_2]?"
    assert vault.restore(second) == "did you mean [EMAIL_1]?"
    assert len(vault) == 1  # the escape is not personal data


def test_entries_never_contain_the_original_values():
    values = ["ann@example.com", "+44 20 7946 0958", "4111111111111111", "GB82WEST12345698765432", "192.168.1.10", "123-45-6789"]
    _, vault = redact(", ".join(values))
    assert sorted(kinds(vault)) == ["card", "email", "iban", "ip", "phone", "ssn"]
    for entry in vault.entries:
        assert set(entry) == {"kind", "placeholder"}
        assert not any(value in str(entry) for value in values)


def stream(vault: Vault, chunks: list[str]) -> list[str]:
    restorer = StreamRestorer(vault)
    return [restorer.feed(c) for c in chunks] + [restorer.flush()]


ANSWER = "Sure: write to [EMAIL_1] [or] call [PHONE_1]."


@pytest.fixture
def vault() -> Vault:
    vault = Vault()
    US.redact("ann@example.com, (415) 555-2671", vault)
    return vault


def test_stream_restores_a_placeholder_split_at_every_point(vault):
    expected = "Sure: write to ann@example.com [or] call (415) 555-2671."
    for cut in range(len(ANSWER) + 1):
        assert "".join(stream(vault, [ANSWER[:cut], ANSWER[cut:]])) == expected, cut
    assert "".join(stream(vault, list(ANSWER))) == expected


def test_stream_holds_back_only_a_possible_placeholder(vault):
    restorer = StreamRestorer(vault)
    assert restorer.feed("write to [EMA") == "write to "
    assert restorer.feed("IL_1] now") == "ann@example.com now"
    assert restorer.feed("see [note") == "see [note"  # cannot become a placeholder: nothing held
    assert restorer.flush() == ""


def test_stream_emits_a_lone_bracket_once_it_cannot_be_a_placeholder(vault):
    restorer = StreamRestorer(vault)
    assert restorer.feed("a [") == "a "
    assert restorer.feed("EMAIL_") == ""
    assert restorer.feed("x and more") == "[EMAIL_x and more"


def test_stream_flush_returns_an_unfinished_tail(vault):
    assert stream(vault, ["ends with [PHO"]) == ["ends with ", "[PHO"]


def test_stream_output_equals_restoring_the_whole_text(vault):
    text = "[[EMAIL_1]] [PHONE_1[EMAIL_1] [PHONE_2] [EMAIL_" * 3
    for size in (1, 2, 3, 5, 8):
        chunks = [text[i : i + size] for i in range(0, len(text), size)]
        assert "".join(stream(vault, chunks)) == vault.restore(text), size


# -- separators: digits grouped with dots, underscores, slashes or any Unicode space -----------------

NBSP, THIN, NARROW_NBSP = "\u00a0", "\u2009", "\u202f"


@pytest.mark.parametrize("sep", [".", "_", "/", NBSP, THIN, NARROW_NBSP, "\u2011"])  # the last: a non-breaking hyphen
def test_masks_a_card_number_grouped_with_any_separator(sep):
    text = f"My card is {sep.join(['4111', '1111', '1111', '1111'])}, expiry 12/29"
    out, vault = redact(text)
    assert out == "My card is [CARD_1], expiry 12/29"
    assert vault.restore(out) == text  # the placeholder stood for the whole span, separators included


@pytest.mark.parametrize("ssn_text", ["123 45 6789", "123.45.6789", f"123{NBSP}45{NBSP}6789", "123_45_6789"])
def test_masks_a_social_security_number_grouped_with_any_separator(ssn_text):
    out, vault = redact(f"SSN {ssn_text} on file")
    assert out == "SSN [SSN_1] on file" and kinds(vault) == ["ssn"]
    assert vault.restore(out) == f"SSN {ssn_text} on file"


def test_masks_an_iban_grouped_with_non_breaking_spaces():
    text = NBSP.join(["GB82", "WEST", "1234", "5698", "7654", "32"])
    assert redact(f"Pay {text} now")[0] == "Pay [IBAN_1] now"


@pytest.mark.parametrize(
    "text",
    [
        "Released 2024-01-02, 2024.01.02 and 01/02/2024",
        "Upgrade from 1.2.3 to v2.10.4 (build 20240102_1530)",
        "The fraction 0.4111111111111111 is not a card",  # 4111111111111111 alone passes Luhn
        "Total 4111111111111111.5 units",
        f"Population 1{THIN}234{THIN}567 and 8{NARROW_NBSP}901",
        "ISBN 978-3-16-148410-0, file_2024_01_02.txt, snake_4111_1111_1111_1111",
        "SSN-like 123456789 and 123 456 789",
    ],
)
def test_leaves_dates_versions_decimals_and_identifiers(text):
    out, vault = redact(text)
    assert out == text and len(vault) == 0


# -- what the remote receives: a real turn against a recording stub ----------------------------------


@pytest.mark.parametrize(
    "value, placeholder",
    [
        ("4111.1111.1111.1111", "[CARD_1]"),
        (f"4111{NBSP}1111{NBSP}1111{NBSP}1111", "[CARD_1]"),
        ("4111_1111_1111_1111", "[CARD_1]"),
        (f"4111{THIN}1111{THIN}1111{THIN}1111", "[CARD_1]"),
        ("123 45 6789", "[SSN_1]"),
    ],
)
def test_the_remote_never_receives_a_grouped_number_and_the_answer_gets_it_back(greedy_settings, serve, value, placeholder):
    stub = serve("ok_stream", deltas=("Noted: ", placeholder[:4], placeholder[4:], "."))
    runtime = Runtime(greedy_settings(), local=None, remote=RemoteModel(stub.url, retries=0))
    result = runtime.ask([{"role": "user", "content": f"Remember {value} for me."}], mode="remote-only")
    sent = [m for m in stub.posts[0].body["messages"] if m["role"] == "user"]
    assert sent[0]["content"] == f"Remember {placeholder} for me."
    everything = json.dumps(stub.posts[0].body, ensure_ascii=False)
    assert value not in everything and value[-4:] not in everything  # not even the last four digits
    assert result.answer == f"Noted: {value}."
