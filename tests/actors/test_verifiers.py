from fractions import Fraction

import pytest

from actors.verifiers import (VERIFIERS, VerifierNotFound, check_reward, chain, exact, get_verifier, gsm8k,
                              last_number, numeric, parse_number, reference_number)

GSM8K_REF = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


@pytest.mark.parametrize("text,value", [
    ("72", 72), ("-3", -3), ("1,234", 1234), ("$12", 12), ("3.50", Fraction(7, 2)), ("7/2", Fraction(7, 2)),
    ("12.", 12), ("  42 apples", 42), ("no digits", None), ("", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_last_number_does_not_read_a_minus_sign_as_a_sign():
    assert last_number("10 - 5 = 5, so the answer is 5") == 5
    assert last_number("1,2,3") == 3
    assert last_number("nothing") is None


def test_reference_number_prefers_gsm8k_marker():
    assert reference_number(GSM8K_REF) == 72
    assert reference_number("The answer is 1,000.") == 1000
    with pytest.raises(ValueError, match="no number"):
        reference_number("seventy-two")


class TestChain:
    def test_correct(self):
        assert chain("3 2 6 1", "3 2 6 1") == 1.0
        assert chain("3 2 6 1 <eos> 9 9", "3 2 6 1") == 1.0  # trailing tokens ignored

    def test_wrong(self):
        assert chain("3 2 6 0", "3 2 6 1") == 0.0
        assert chain("3 2 6", "3 2 6 1") == 0.0  # too short

    def test_malformed(self):
        assert chain("", "3 2 6 1") == 0.0
        assert chain("three two", "3 2 6 1") == 0.0
        with pytest.raises(ValueError):
            chain("3", "")


class TestNumeric:
    def test_correct(self):
        assert numeric("So she has 72 clips.", "72") == 1.0
        assert numeric("The total is $1,234.00", "1234") == 1.0
        assert numeric("72", GSM8K_REF) == 1.0
        assert numeric("x = 3.5", "7/2") == 1.0

    def test_wrong(self):
        assert numeric("She has 71 clips.", "72") == 0.0
        assert numeric("72 then 73", "72") == 0.0  # the last number counts

    def test_malformed(self):
        assert numeric("", "72") == 0.0
        assert numeric("I don't know", "72") == 0.0
        with pytest.raises(ValueError):  # a reference without a number is a data error, not a wrong answer
            numeric("72", "unknown")


class TestGsm8k:
    def test_correct(self):
        assert gsm8k("48/2 = 24, 48 + 24 = 72\n#### 72", GSM8K_REF) == 1.0
        assert gsm8k("#### 1,000", "1000") == 1.0
        assert gsm8k("####72 clips", "72") == 1.0

    def test_wrong(self):
        assert gsm8k("#### 71", GSM8K_REF) == 0.0
        assert gsm8k("#### 72", "73") == 0.0

    def test_malformed(self):
        assert gsm8k("The answer is 72", "72") == 0.0  # no marker
        assert gsm8k("#### seventy-two", "72") == 0.0
        assert gsm8k("", "72") == 0.0


def test_exact():
    assert exact(" Paris\n", "Paris") == 1.0
    assert exact("paris", "Paris") == 0.0
    assert exact("", "Paris") == 0.0


def test_registry_and_import_path():
    assert set(VERIFIERS) >= {"chain", "numeric", "gsm8k"}
    assert get_verifier("gsm8k") is gsm8k
    assert get_verifier("actors.verifiers:numeric") is numeric


@pytest.mark.parametrize("spec,match", [
    ("nope", "unknown verifier 'nope'; choose one of chain, numeric, gsm8k"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("actors.verifiers:no_such_fn", "module 'actors.verifiers' has no attribute 'no_such_fn'"),
    ("actors.verifiers:VERIFIERS", "is not callable"),
    (":f", "must be of the form module:function"),
])
def test_bad_verifier_specs_are_named(spec, match):
    with pytest.raises(VerifierNotFound, match=match):
        get_verifier(spec)


def test_check_reward():
    assert check_reward(True, "v") == 1.0
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="not a reward"):
            check_reward(bad, "v")
    with pytest.raises((TypeError, ValueError)):
        check_reward("high", "v")
