"""core.charset: decoding every case of tests/charsets.py, the fallback for unknown and wrongly
declared sets, and the choice of the set an answer is written in."""

from __future__ import annotations

import pytest

from nnunet_node.core.charset import answer_charset, can_encode, decode, terms_of
from tests.charsets import CASES, CharsetCase


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_each_case_decodes_to_its_name(case: CharsetCase) -> None:
    decoded = decode(case.encoded, case.charset_value, vr="PN")
    assert decoded.text == case.expected
    assert (decoded.warning is not None) == (case.id == "unknown term")


def test_wrongly_declared_utf8_falls_back_to_latin1_with_a_warning() -> None:
    decoded = decode("Müller^Jürgen".encode("latin-1"), "ISO_IR 192", vr="PN")
    assert decoded.text == "Müller^Jürgen"
    assert decoded.warning == "not valid ISO_IR 192: read as ISO 8859-1 (ISO_IR 100)"


def test_unknown_term_with_bytes_that_are_not_utf8_reads_as_latin1() -> None:
    decoded = decode(b"M\xfcller", "ISO_IR 999", vr="LO")
    assert decoded.text == "Müller"
    assert decoded.warning is not None and "ISO 8859-1" in decoded.warning


def test_misspelt_term_is_corrected_without_a_warning() -> None:
    assert decode("Müller".encode("latin-1"), "ISO_IR100", vr="PN").warning is None
    assert decode("Müller".encode("latin-1"), "ISO-IR 100", vr="PN").text == "Müller"


def test_terms_keep_an_empty_first_value() -> None:
    assert terms_of("\\ISO 2022 IR 87") == ["", "ISO 2022 IR 87"]
    assert terms_of(b"ISO_IR 192") == ["ISO_IR 192"]
    assert terms_of(None) == []


def test_answer_charset_prefers_the_request_when_it_can_hold_the_values() -> None:
    japanese = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert answer_charset([japanese], ["", "ISO 2022 IR 87"]) == ["", "ISO 2022 IR 87"]
    assert answer_charset([japanese], "ISO_IR 100") == "ISO_IR 192"
    assert answer_charset(["Müller"], "ISO_IR 100") == "ISO_IR 100"
    assert answer_charset(["Müller"], ["", "ISO 2022 IR 87"]) == "ISO_IR 192"
    assert answer_charset(["Doe^Jane"], None) is None
    assert answer_charset(["Müller"], None) == "ISO_IR 192"
    assert not can_encode(["王^小东"], "ISO_IR 999")
