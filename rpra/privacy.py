"""Redaction: personal data is masked before a deferred request leaves the device, and put back
into the answer as it streams in.

What is detected, and how (a well-kept library wherever one fits):

- phone numbers: Google's libphonenumber (``phonenumbers``), international (+44 ...) and the
  national format of ``phone_region``, kept only when valid for a real numbering plan;
- card numbers: 13-19 digits, whole or in groups of 3-6, that pass the Luhn checksum
  (``stdnum.luhn``), so an ordinary long number is left alone;
- IBANs: upper case, whole or in groups split by spaces, that pass the ISO 7064 check (``stdnum.iban``);
- US social security numbers in groups NNN NN NNNN that ``stdnum.us.ssn`` accepts;
- e-mail addresses: a regular expression (no library finds them in free text);
- IPv4 and IPv6 addresses that the standard ``ipaddress`` module parses. "1.2.3.4" *is* an
  address and is masked: a four-part version number is rare, and a false positive costs little
  because the answer gets the value back. "v1.2.3.4" and "1.2.3.4.5" are not addresses. An IPv6
  address needs three groups or more (or an IPv4 tail), so C++ names like ``abc::def`` stay, at
  the price of short forms like ``fe80::1``.

Digit groups may be split by any one separator people or their software use: a space of any
Unicode kind (a word processor or web page turns it into a non-breaking or thin space), a hyphen
or dash, a dot, an underscore or a slash: "4111.1111.1111.1111", "123 45 6789". A value is
never cut out of a longer run at a dot, because digits next to a dot are a decimal's or a
version's ("0.4111111111111111" stays), and a value needs its groups (an ungrouped nine-digit
number is not an SSN), so dates, versions and decimals are too short or shaped wrong to match.
A placeholder stands for the whole span, separators included, so restoring gives it back as written.

Not detected: names, street addresses, birth dates (free-text entities need a model, and the
device has no room for another one), nor a phone number run straight into another number
("415-555-2671 1234"), which libphonenumber reads as one invalid number.

Where detections overlap, the longer span wins (a card number is never also a phone number); on
a tie, the kind listed first in ``KINDS``, checksum-validated kinds before pattern-only ones.

Placeholders look like ``[EMAIL_1]``. Within one :class:`Vault` the same original always gets
the same placeholder, so a conversation stays consistent. Originals are matched exactly
(``A@x.com`` and ``a@x.com`` are two values) so that restoring gives back what was written.
Restoring only knows the exact form: a remote model that writes ``[email_1]`` or ``EMAIL_1``
gets no value back, which is safer than guessing.

Placeholder-looking text the user wrote must survive. A literal ``[EMAIL_1]`` in the input is
*reserved*: numbering skips it and restoring leaves it as it is. If it appears only after that
placeholder was issued (a later message redacted with the same vault), it is escaped instead:
masked like a value, under a fresh placeholder that restores to the literal text. Either way
redact-then-restore is the identity.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections.abc import Callable, Iterator

import phonenumbers
from stdnum import iban, luhn
from stdnum.us import ssn

from rpra.errors import ConfigError

KINDS = ("email", "iban", "card", "ssn", "ip", "phone")
_RANK = {"literal": -1} | {kind: i for i, kind in enumerate(KINDS)}

_PLACEHOLDER = re.compile(r"\[(EMAIL|IBAN|CARD|SSN|IP|PHONE)_([0-9]+)\]")

# The lookbehinds make each pattern start only at the beginning of a token, so a long run of
# letters or digits is scanned once rather than from every position (linear, not quadratic).
_EMAIL = re.compile(
    r"(?<![\w.%+-])[\w.%+-]{1,64}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![\w-])"
)
# Unicode's space separators (category Zs: the no-break, thin and narrow no-break spaces among
# them), and the hyphen-minus, hyphen, non-breaking hyphen, figure dash and en dash.
_SPACES = r"\u0020\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"
_DASHES = r"\-\u2010-\u2013"
# Runs of groups joined by single separators; the stretch that validates is picked later, so
# "order 2024 4111 1111 1111 1111" still finds the card after the year.
_DIGIT_RUN = re.compile(rf"(?<![\w.,])[0-9]+(?:[{_SPACES}{_DASHES}._/][0-9]+)*(?!\w|[.,][0-9])")
_IBAN_RUN = re.compile(rf"(?<!\w)[A-Z]{{2}}[0-9]{{2}}[A-Z0-9]*(?:[{_SPACES}][A-Z0-9]+)*(?!\w)")
_IPV4 = re.compile(r"(?<![\w.])[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?!\w|\.[0-9])")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9A-Fa-f]{0,4})(?![\w:]|\.[0-9])"
)
_GROUP = re.compile(r"[A-Z0-9]+")
_MAX_GROUPS = 9  # an IBAN in groups of four: 34 characters at most

Span = tuple[int, int, str]


class Vault:
    """Placeholder -> original for one request or conversation. It never leaves the device."""

    def __init__(self) -> None:
        self._originals: dict[str, str] = {}  # placeholder -> original
        self._placeholders: dict[str, str] = {}  # original -> placeholder
        self._reserved: set[str] = set()  # placeholder-looking text the user wrote themselves
        self._next: dict[str, int] = {}
        self.entries: list[dict] = []  # what was masked, safe to log: kind and placeholder, never the value

    def __len__(self) -> int:
        return len(self.entries)

    def reserve(self, text: str) -> None:
        """Keep placeholder-looking text in ``text`` from ever being issued as a placeholder."""
        self._reserved.update(m.group() for m in _PLACEHOLDER.finditer(text) if m.group() not in self._originals)

    def issued(self, placeholder: str) -> bool:
        """Whether ``placeholder`` stands for a value in this vault."""
        return placeholder in self._originals

    def mask(self, kind: str, original: str, *, record: bool = True) -> str:
        """The placeholder for ``original``: the one it already has, or a fresh one.

        ``record=False`` escapes a literal placeholder: it is restored but not listed in ``entries``.
        """
        if (placeholder := self._placeholders.get(original)) is not None:
            return placeholder
        n = self._next.get(kind, 1)
        while (placeholder := f"[{kind.upper()}_{n}]") in self._originals or placeholder in self._reserved:
            n += 1
        self._next[kind] = n + 1
        self._originals[placeholder], self._placeholders[original] = original, placeholder
        if record:
            self.entries.append({"kind": kind, "placeholder": placeholder})
        return placeholder

    def restore(self, text: str) -> str:
        """``text`` with every issued placeholder, in its exact form, replaced by its original."""
        # One pass: an original is never rescanned, so a value that looks like a placeholder stays.
        return _PLACEHOLDER.sub(lambda m: self._originals.get(m.group(), m.group()), text)

    def is_partial(self, tail: str) -> bool:
        """Whether ``tail`` is the start, but not the whole, of an issued placeholder."""
        return any(len(p) > len(tail) and p.startswith(tail) for p in self._originals)


class Redactor:
    """Finds personal data in text and swaps it for placeholders kept in a :class:`Vault`."""

    def __init__(self, *, phone_region: str = "US") -> None:
        region = phone_region.upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ConfigError(
                f"Unknown phone_region {phone_region!r}: set it to a two-letter ISO 3166 country code such as US, GB or DE."
            )
        self.phone_region = region

    def redact(self, text: str, vault: Vault) -> str:
        """``text`` with each detected value replaced by its placeholder in ``vault``."""
        vault.reserve(text)
        spans = list(self.detect(text))
        # A literal copy of a placeholder issued earlier would restore to that value: escape it.
        spans += [(m.start(), m.end(), "literal") for m in _PLACEHOLDER.finditer(text) if vault.issued(m.group())]
        out, pos = [], 0
        for start, end, kind in _resolve(spans):
            value = text[start:end]
            if kind == "literal":
                placeholder = vault.mask(_PLACEHOLDER.fullmatch(value).group(1).lower(), value, record=False)
            else:
                placeholder = vault.mask(kind, value)
            out += [text[pos:start], placeholder]
            pos = end
        out.append(text[pos:])
        return "".join(out)

    def detect(self, text: str) -> Iterator[Span]:
        """Every candidate span (start, end, kind), overlaps included."""
        yield from ((m.start(), m.end(), "email") for m in _EMAIL.finditer(text))
        yield from _stretches(text, _IBAN_RUN, _is_iban, "iban")
        yield from _stretches(text, _DIGIT_RUN, _is_card, "card")
        yield from _stretches(text, _DIGIT_RUN, _is_ssn, "ssn")
        yield from ((m.start(), m.end(), "ip") for m in _IPV4.finditer(text) if _is_ipv4(m.group()))
        yield from ((m.start(), m.end(), "ip") for m in _IPV6.finditer(text) if _is_ipv6(m.group()))
        matcher = phonenumbers.PhoneNumberMatcher(text, self.phone_region, leniency=phonenumbers.Leniency.VALID)
        yield from ((m.start, m.end, "phone") for m in matcher)


class StreamRestorer:
    """Restores placeholders in a streamed answer, where one may arrive split across chunks."""

    def __init__(self, vault: Vault) -> None:
        self._vault = vault
        self._held = ""

    def feed(self, chunk: str) -> str:
        """The restored text that is safe to show now.

        Only a trailing start of a placeholder ("[EMA") is held back, so what is held is always
        shorter than the longest placeholder and an unmatched "[" never stalls the stream.
        """
        text = self._held + chunk
        # A placeholder has one "[", at its start: a partial one can only begin at the last "[".
        cut = text.rfind("[")
        if cut < 0 or not self._vault.is_partial(text[cut:]):
            cut = len(text)
        self._held = text[cut:]
        return self._vault.restore(text[:cut])

    def flush(self) -> str:
        """Whatever is still held, at the end of the stream."""
        text, self._held = self._held, ""
        return self._vault.restore(text)


def redact_messages(messages: list[dict], redactor: Redactor) -> tuple[list[dict], Vault]:
    """Redact a conversation with one vault, so a value keeps its placeholder from turn to turn."""
    vault = Vault()
    for m in messages:  # before anything is issued: no placeholder may equal text the user wrote
        vault.reserve(m["content"])
    return [{**m, "content": redactor.redact(m["content"], vault)} for m in messages], vault


def _resolve(spans: list[Span]) -> list[Span]:
    """Non-overlapping spans in text order: escaped literals, then longest first, ties to the more specific kind."""
    chosen: list[Span] = []
    starts: list[int] = []
    for span in sorted(spans, key=lambda s: (s[2] != "literal", s[0] - s[1], _RANK[s[2]], s[0])):
        start, end, _ = span
        k = bisect.bisect(starts, start)
        if (k and chosen[k - 1][1] > start) or (k < len(chosen) and chosen[k][0] < end):
            continue
        chosen.insert(k, span)
        starts.insert(k, start)
    return chosen


def _stretches(text: str, runs: re.Pattern, accept: Callable[[list[str]], bool], kind: str) -> Iterator[Span]:
    """In each run of separated groups, the longest stretches of whole groups that ``accept`` takes.

    A stretch starts and ends at the run's ends or at a separator other than a dot: "3.14" and
    "1.2.3" are one number each, so no value is cut out of them.
    """
    for run in runs.finditer(text):
        groups = [(run.start() + g.start(), run.start() + g.end()) for g in _GROUP.finditer(run.group())]
        cuts = [True] + [text[end] != "." for _, end in groups[:-1]] + [True]  # cuts[k]: before group k
        i = 0
        while i < len(groups):
            for j in range(min(len(groups), i + _MAX_GROUPS) - 1, i - 1, -1):
                if cuts[i] and cuts[j + 1] and accept([text[s:e] for s, e in groups[i : j + 1]]):
                    yield groups[i][0], groups[j][1], kind
                    i = j
                    break
            i += 1


def _is_card(groups: list[str]) -> bool:
    digits = "".join(groups)
    shaped = len(groups) == 1 or all(3 <= len(g) <= 6 for g in groups)
    return shaped and 13 <= len(digits) <= 19 and luhn.is_valid(digits)


def _is_ssn(groups: list[str]) -> bool:
    return [len(g) for g in groups] == [3, 2, 4] and ssn.is_valid("".join(groups))


def _is_iban(groups: list[str]) -> bool:
    compact = "".join(groups)
    return 15 <= len(compact) <= 34 and iban.is_valid(compact)


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)  # also refuses octets over 255 and leading zeros
    except ValueError:
        return False
    return True


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return len([g for g in re.split(r"[:.]", text) if g]) >= 3
