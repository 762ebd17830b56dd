"""Codes: shape, check character, generation and planning (pure; deterministic RNG)."""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import errors
from engine.codes import (
    ALPHABETIC_CHARSET,
    DEFAULT_CHARSET,
    NUMERIC_CHARSET,
    CodeSpec,
    GenerationPlan,
    generate,
    generate_unique,
    normalize,
    plan,
)


def seeded(seed: int = 1234) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def cyclic_bytes() -> Callable[[int], bytes]:
    """0, 1, ..., 255, 0, 1, ... across calls: every byte value equally often."""
    state = {"next": 0}

    def draw(n: int) -> bytes:
        start = state["next"]
        state["next"] = (start + n) % 256
        return bytes((start + i) % 256 for i in range(n))

    return draw


# Charset sizes covering every check scheme: odd (weighted mod N), multiples of 4
# (GF(2^k) x Z_m), and 10 (Damm).
CHECK_CHARSETS = [
    DEFAULT_CHARSET,  # 31
    ALPHABETIC_CHARSET,  # 23
    NUMERIC_CHARSET,  # 10
    "0123456789ABCDEF",  # 16
    "ABCDEFGHJKMNPQRSTVWXYZ0123456789",  # 32, Crockford-style base32
    "ABC",  # 3
    "ABCD",  # 4
    "ABCDEFGHIJKL",  # 12 = 4 * 3
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",  # 36 = 4 * 9
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!$%&()*+,-./:;<=>?@[]^_{|}~",  # 63
]


# --- normalisation and spec creation ------------------------------------------------


def test_normalize_strips_and_uppercases() -> None:
    assert normalize("  sale-ab12\n") == "SALE-AB12"


def test_default_spec_and_named_charsets() -> None:
    spec = CodeSpec()
    assert spec.length == 10 and spec.charset == DEFAULT_CHARSET and len(DEFAULT_CHARSET) == 31
    assert set(DEFAULT_CHARSET).isdisjoint("01OIL")
    assert CodeSpec.create().charset == DEFAULT_CHARSET
    assert CodeSpec.create(charset="alphabetic").charset == ALPHABETIC_CHARSET
    assert set(ALPHABETIC_CHARSET).isdisjoint("ILO") and len(ALPHABETIC_CHARSET) == 23
    assert CodeSpec.create(charset="Numbers").charset == "0123456789"
    assert CodeSpec.create(charset="abcx").charset == "ABCX"


def test_create_uppercases_and_derives_length_from_pattern() -> None:
    spec = CodeSpec.create(pattern="sale-####-####", prefix="x-", postfix="_z")
    assert spec.pattern == "SALE-####-####"
    assert spec.length == 8
    assert (spec.prefix, spec.postfix) == ("X-", "_Z")
    assert spec.code_length == 2 + 14 + 2
    assert CodeSpec.create(pattern="##-##", check_char=True).code_length == 6


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"length": 3}, "length"),
        ({"length": 65}, "length"),
        ({"length": "10"}, "length"),
        ({"length": True}, "length"),
        ({"charset": "A"}, "charset"),
        ({"charset": "AAB"}, "charset"),
        ({"charset": "aA"}, "charset"),
        ({"charset": "AB C"}, "charset"),
        ({"charset": "AB#"}, "charset"),
        ({"charset": "ABé"}, "charset"),
        ({"charset": 7}, "charset"),
        ({"prefix": "X" * 33}, "prefix"),
        ({"prefix": "SALE!"}, "prefix"),
        ({"prefix": "SA LE"}, "prefix"),
        ({"postfix": "ü"}, "postfix"),
        ({"postfix": 3}, "postfix"),
        ({"pattern": "SALE-###"}, "pattern"),
        ({"pattern": "#" * 65}, "pattern"),
        ({"pattern": "SALE*####"}, "pattern"),
        ({"pattern": "####", "length": 5}, "length"),
        ({"check_char": "yes"}, "check_char"),
        ({"charset": "ABCDEFGHIJKLMN", "check_char": True}, "check_char"),  # 14 = 2 * 7
        ({"charset": "AB", "check_char": True}, "check_char"),
    ],
)
def test_bad_spec_input_raises_invalid_input_naming_the_field(
    kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(errors.InvalidInput, match=field):
        CodeSpec.create(**kwargs)  # type: ignore[arg-type]


def test_constructor_validates_canonical_form_too() -> None:
    with pytest.raises(errors.InvalidInput, match="length"):
        CodeSpec(length=2)
    with pytest.raises(errors.InvalidInput, match="upper-case"):
        CodeSpec(charset="abc")
    with pytest.raises(errors.InvalidInput, match="pattern"):
        CodeSpec(pattern="SALE-####-####")  # length 10 != 8 '#'


def test_spec_round_trips_through_msgspec() -> None:
    spec = CodeSpec.create(pattern="GIFT-####-####", check_char=True, prefix="Q")
    data = msgspec.json.encode(spec)
    assert msgspec.json.decode(data, type=CodeSpec) == spec
    assert msgspec.convert(msgspec.to_builtins(spec), CodeSpec) == spec
    with pytest.raises(errors.InvalidInput):
        msgspec.convert({"length": 3}, CodeSpec)


# --- generation ---------------------------------------------------------------------


def test_generation_is_deterministic_for_a_given_random_source() -> None:
    spec = CodeSpec.create(check_char=True)
    assert generate(spec, 500, seeded(7)) == generate(spec, 500, seeded(7))
    assert generate(spec, 500, seeded(7)) != generate(spec, 500, seeded(8))
    assert generate(spec, 0, seeded()) == []
    with pytest.raises(errors.InvalidInput, match="n must"):
        generate(spec, -1, seeded())


def test_default_codes_use_only_the_charset_and_no_look_alikes() -> None:
    codes = generate(CodeSpec(), 20_000, seeded())
    assert len(codes) == 20_000
    assert all(len(c) == 10 for c in codes)
    used = set("".join(codes))
    assert used == set(DEFAULT_CHARSET)
    assert used.isdisjoint("01OIL")


def test_characters_are_uniform_chi_square() -> None:
    spec = CodeSpec()
    codes = generate(spec, 100_000, seeded(42))
    counts = Counter("".join(codes))
    n = 1_000_000
    expected = n / 31
    chi2 = sum((counts[c] - expected) ** 2 / expected for c in DEFAULT_CHARSET)
    # 30 degrees of freedom: the 99.9999% quantile is about 80.
    assert chi2 < 80, chi2
    # each position on its own is uniform too
    for pos in (0, 9):
        col = Counter(c[pos] for c in codes)
        exp = 100_000 / 31
        assert sum((col[c] - exp) ** 2 / exp for c in DEFAULT_CHARSET) < 80


def test_rejection_sampling_is_exactly_unbiased_on_a_balanced_source() -> None:
    # 248 = 8 * 31 accepted byte values per 256; bytes 248..255 must be dropped, so a source
    # giving every byte value equally often yields every character exactly equally often.
    codes = generate(CodeSpec(), 248 * 10, cyclic_bytes())  # 24,800 characters
    counts = Counter("".join(codes))
    assert set(counts.values()) == {24_800 // 31}


def test_pattern_prefix_and_postfix_are_respected() -> None:
    spec = CodeSpec.create(
        pattern="sale-####-####", prefix="X-", postfix="-EU", charset="numbers", check_char=True
    )
    codes = generate(spec, 2_000, seeded())
    rx = re.compile(r"^X-SALE-\d{4}-\d{4}\d-EU$")
    assert all(rx.match(c) for c in codes), codes[:3]
    assert all(spec.verify(c) for c in codes)


@pytest.mark.parametrize("charset", CHECK_CHARSETS)
@pytest.mark.parametrize("pattern", [None, "AB-###-##_#"])
def test_generated_codes_verify_and_match_build(charset: str, pattern: str | None) -> None:
    spec = CodeSpec.create(charset=charset, pattern=pattern, prefix="P", check_char=True)
    codes = generate(spec, 3_000, seeded(3))
    for code in codes:
        assert spec.verify(code), code
        assert spec.is_well_formed(code.lower() + " ")
        assert spec.check(f" {code.lower()}") == code
        body = code[1 : 1 + len(pattern or "#" * spec.length)]
        rand = "".join(ch for ch, t in zip(body, pattern or "#" * len(body)) if t == "#")
        assert spec.build(rand) == code


def test_check_rejects_with_a_reason() -> None:
    spec = CodeSpec.create(pattern="SALE-####", prefix="X", postfix="Z", check_char=True)
    good = spec.build("ABCD")
    assert good.startswith("XSALE-ABCD") and good.endswith("Z") and len(good) == 12
    cases = {
        good[:-1]: "characters",
        "Y" + good[1:]: "start with",
        good[:-1] + "Y": "end with",
        good.replace("SALE", "SALT"): "expected 'E'",
        good.replace("ABCD", "ABC1"): "not allowed",
        good.replace("ABCD", "ABCE"): "check character",
    }
    for code, reason in cases.items():
        assert not spec.verify(code)
        with pytest.raises(errors.MalformedCode, match=reason):
            spec.check(code)
    with pytest.raises(errors.MalformedCode):
        spec.check(123)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidInput, match="random_chars"):
        spec.build("ABC")
    with pytest.raises(errors.InvalidInput, match="random_chars"):
        spec.build("ABC1")


# --- the check character catches typos ----------------------------------------------


@st.composite
def spec_and_random_part(draw: st.DrawFn) -> tuple[CodeSpec, str]:
    charset = draw(st.sampled_from(CHECK_CHARSETS))
    length = draw(st.integers(min_value=4, max_value=16))
    spec = CodeSpec.create(length=length, charset=charset, check_char=True)
    rand = draw(st.text(alphabet=spec.charset, min_size=length, max_size=length))
    return spec, rand


@settings(max_examples=300, deadline=None)
@given(spec_and_random_part())
def test_check_char_catches_every_single_substitution(case: tuple[CodeSpec, str]) -> None:
    spec, rand = case
    code = spec.build(rand)
    assert spec.verify(code)
    for i in range(len(code)):
        for ch in spec.charset:
            if ch != code[i]:
                typo = code[:i] + ch + code[i + 1 :]
                assert not spec.verify(typo), (code, typo)


@settings(max_examples=300, deadline=None)
@given(spec_and_random_part())
def test_check_char_catches_every_adjacent_transposition(case: tuple[CodeSpec, str]) -> None:
    spec, rand = case
    code = spec.build(rand)
    for i in range(len(code) - 1):
        if code[i] != code[i + 1]:
            typo = code[:i] + code[i + 1] + code[i] + code[i + 2 :]
            assert not spec.verify(typo), (code, typo)


@pytest.mark.parametrize("charset", CHECK_CHARSETS)
def test_check_char_catches_all_transpositions_and_substitutions_exhaustively(
    charset: str,
) -> None:
    # Every ordered pair of characters, at both position parities, after varied prefixes:
    # hypothesis samples codes; this covers every pair so no rare pair slips through.
    spec4 = CodeSpec.create(length=4, charset=charset, check_char=True)
    spec5 = CodeSpec.create(length=5, charset=charset, check_char=True)
    rng = random.Random(5)
    for a in charset:
        for b in charset:
            if a == b:
                continue
            for spec in (spec4, spec5):
                ctx = "".join(rng.choice(charset) for _ in range(spec.length - 2))
                for rand in (ctx + a + b, a + b + ctx, ctx[:1] + a + b + ctx[1:]):
                    code = spec.build(rand)
                    i = rand.index(a + b)
                    assert not spec.verify(code[:i] + b + a + code[i + 2 :])
                    assert not spec.verify(code[:i] + b + code[i + 1 :])
                    # the check character itself substituted
                    assert not spec.verify(code[:-1] + (a if code[-1] != a else b))


# --- unique generation --------------------------------------------------------------


def test_generate_unique_gives_n_distinct_codes_outside_exclude() -> None:
    spec = CodeSpec.create(length=4, charset="numbers")
    exclude = set(generate(spec, 3_000, seeded(1)))
    codes = generate_unique(spec, 5_000, seeded(2), exclude=exclude)
    assert len(codes) == 5_000 == len(set(codes))
    assert not exclude.intersection(codes)
    assert all(spec.verify(c) for c in codes)
    assert generate_unique(spec, 0, seeded()) == []


def test_generate_unique_can_exhaust_a_tiny_space_exactly() -> None:
    spec = CodeSpec.create(length=4, charset="AB")  # 16 codes
    everything = generate_unique(spec, 16, seeded())
    assert sorted(everything) == sorted(
        a + b + c + d for a in "AB" for b in "AB" for c in "AB" for d in "AB"
    )
    rest = generate_unique(spec, 6, seeded(9), exclude=set(everything[:10]))
    assert sorted(rest) == sorted(everything[10:])


def test_generate_unique_raises_when_it_cannot_make_progress() -> None:
    spec = CodeSpec.create(length=4, charset="AB")
    with pytest.raises(errors.InfeasibleGeneration, match="impossible"):
        generate_unique(spec, 17, seeded())
    taken = set(generate_unique(spec, 10, seeded()))
    with pytest.raises(errors.InfeasibleGeneration, match="used up"):
        generate_unique(spec, 7, seeded(4), exclude=taken)


# --- planning -----------------------------------------------------------------------


def test_plan_numbers_on_a_hand_checked_case() -> None:
    spec = CodeSpec.create(length=4, charset="numbers")  # 10,000 codes
    p = plan(spec, 10, existing=90, max_guess_probability=0.05)
    assert isinstance(p, GenerationPlan)
    assert p.code_space == 10_000
    assert (p.count, p.existing) == (10, 90)
    assert p.fill_ratio == pytest.approx(0.01)
    assert p.guess_hit_probability == pytest.approx(0.01)
    # draws see 90, 91, ..., 99 taken codes: (90 * 10 + 45) / 10,000
    assert p.expected_collisions == pytest.approx(0.0945)
    assert p.feasible and p.reason is None
    assert p.min_length == 4


def test_plan_default_spec_million_codes_is_fine() -> None:
    p = plan(CodeSpec(), 1_000_000)
    assert p.code_space == 31**10
    assert p.feasible
    assert p.guess_hit_probability == pytest.approx(1e6 / 31**10)
    assert p.expected_collisions == pytest.approx(1e6 * (1e6 - 1) / 2 / 31**10)


def test_plan_million_codes_from_four_chars_is_impossible_and_says_what_works() -> None:
    spec = CodeSpec.create(length=4)
    with pytest.raises(errors.InfeasibleGeneration) as info:
        plan(spec, 1_000_000)
    msg = info.value.message
    assert "1,000,000 codes" in msg and "923,521" in msg and "4 chars of 31" in msg
    assert "impossible" in msg
    # 31**6 = 887,503,681 < 1e6 / 1e-4 <= 31**7
    assert "use at least 7 characters" in msg


def test_plan_rejects_a_crowded_space_even_when_guessing_is_allowed() -> None:
    spec = CodeSpec.create(length=4)
    with pytest.raises(errors.InfeasibleGeneration, match=r"10\.8%.*use at least 5"):
        plan(spec, 100_000, max_guess_probability=1.0)
    p = plan(spec, 50_000, existing=50_000, max_guess_probability=1.0, strict=False)
    assert not p.feasible and p.reason is not None and "plus 50,000 existing" in p.reason


def test_plan_rejects_guessable_codes_and_suggests_a_length() -> None:
    spec = CodeSpec.create(pattern="GIFT-####")
    with pytest.raises(errors.InfeasibleGeneration, match="guess") as info:
        plan(spec, 1_000)  # 1,000 / 923,521 > 1e-4
    # 31**4 = 923,521 < 1,000 / 1e-4 = 1e7 <= 31**5 = 28,629,151
    assert "use at least 5 random characters" in info.value.message
    assert plan(spec, 1_000, max_guess_probability=0.01).feasible


@pytest.mark.parametrize("count", [0, -5])
def test_plan_rejects_non_positive_counts(count: int) -> None:
    with pytest.raises(errors.InvalidInput, match="count"):
        plan(CodeSpec(), count)


def test_plan_rejects_negative_existing() -> None:
    with pytest.raises(errors.InvalidInput, match="existing"):
        plan(CodeSpec(), 10, existing=-1)
