"""Voucher codes: their shape, their check character, fast bulk generation and planning.

A :class:`CodeSpec` says what a campaign's codes look like: how many random characters
from which charset, an optional pattern with literal parts (``SALE-####-####``), a fixed
prefix and postfix, and an optional check character. Codes are stored normalised
(:func:`normalize`: stripped and upper-cased), so every charset and literal is upper-case.

Generation must produce millions of codes per second in CPython, so nothing here loops
over characters in Python on the bulk path: random bytes are mapped to charset characters
with ``bytes.translate`` (rejection sampling happens in its ``delete`` argument), codes are
laid out with strided slice assignment into one buffer, and the check character is computed
column by column with ``translate`` plus big-integer additions/xors acting as byte-wise
vector operations. Randomness is injected (``os.urandom`` / ``secrets.token_bytes`` in
production) so the module stays pure and tests stay deterministic.

Check character. The classic Luhn mod N only catches every single-character substitution
and every adjacent transposition when N is even, and even then misses the transposition of
the charset's first and last characters; the default charset has 31 characters (odd), where
Luhn's doubling is not even a bijection. So the check character is a weighted sum that
carries the same guarantee for every supported charset size:

* N odd: ``sum(w_i * x_i) = 0 (mod N)`` with weights alternating 1, 2. Both weights and
  their difference are units mod an odd N, so a substitution changes the sum by
  ``w * (a - b) != 0`` and a transposition by ``±(a - b) != 0``.
* N = 2^k * m with k >= 2 (m odd): by the Chinese remainder theorem a character index is a
  pair (index mod 2^k, index mod m); the first part is checked as above in GF(2^k) (weights
  1 and x, summed with xor), the second mod m. Whichever part a typo changes, it is caught.
* N = 10 (``numbers``): Damm's algorithm with its published order-10 quasigroup.
* N = 2 * odd, other than 10, has no such simple scheme; a check character is refused there.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Container
from typing import Final

import msgspec

from engine import errors

__all__ = [
    "ALPHABETIC_CHARSET",
    "DEFAULT_CHARSET",
    "MAX_AFFIX_LENGTH",
    "MAX_RANDOM_LENGTH",
    "MIN_RANDOM_LENGTH",
    "NAMED_CHARSETS",
    "NUMERIC_CHARSET",
    "PLACEHOLDER",
    "CodeSpec",
    "GenerationPlan",
    "RandomBytes",
    "generate",
    "generate_unique",
    "normalize",
    "plan",
    "resolve_charset",
]

DEFAULT_CHARSET: Final = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
"""Digits and upper-case letters without the look-alikes 0/O, 1/I/L (31 characters)."""
ALPHABETIC_CHARSET: Final = "ABCDEFGHJKMNPQRSTUVWXYZ"
"""Upper-case letters without I, L, O (23 characters)."""
NUMERIC_CHARSET: Final = "0123456789"

NAMED_CHARSETS: Final[dict[str, str]] = {
    "alphanumeric": DEFAULT_CHARSET,
    "alphabetic": ALPHABETIC_CHARSET,
    "numbers": NUMERIC_CHARSET,
}

PLACEHOLDER: Final = "#"
MIN_RANDOM_LENGTH: Final = 4
MAX_RANDOM_LENGTH: Final = 64
MAX_AFFIX_LENGTH: Final = 32
DEFAULT_MAX_FILL: Final = 0.1
DEFAULT_MAX_GUESS_PROBABILITY: Final = 1e-4

RandomBytes = Callable[[int], bytes]
"""``random_bytes(n)`` returns ``n`` bytes from a CSPRNG (``os.urandom`` in production)."""

_LITERAL_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
# Printable, non-blank ASCII. ASCII only, so that upper-casing never changes a length
# and every character is one byte for the translate-based generator.
_CHARSET_CHARS: Final = frozenset(chr(c) for c in range(33, 127)) - {PLACEHOLDER}


def normalize(code: str) -> str:
    """The stored form of a code: surrounding whitespace stripped, upper-cased."""
    return code.strip().upper()


def resolve_charset(charset: str) -> str:
    """A charset name (``alphanumeric``, ``alphabetic``, ``numbers``) or explicit
    characters, validated and upper-cased. Raises :class:`~engine.errors.InvalidInput`."""
    if not isinstance(charset, str):
        raise errors.InvalidInput("charset must be a string: a charset name or its characters")
    named = NAMED_CHARSETS.get(charset.strip().lower())
    if named is not None:
        return named
    chars = charset.upper()
    _validate_charset(chars)
    return chars


def _validate_charset(chars: str) -> None:
    bad = sorted({c for c in chars if c not in _CHARSET_CHARS})
    if bad:
        raise errors.InvalidInput(
            f"charset may only hold printable ASCII characters other than '#' and "
            f"whitespace; found {''.join(bad)!r}"
        )
    if len(set(chars)) != len(chars):
        dupes = sorted({c for c in chars if chars.count(c) > 1})
        raise errors.InvalidInput(
            f"charset has repeated characters (after upper-casing): {''.join(dupes)!r}"
        )
    if len(chars) < 2:
        raise errors.InvalidInput(
            f"charset needs at least 2 distinct characters (or one of "
            f"{', '.join(NAMED_CHARSETS)}); got {len(chars)}"
        )


def _validate_affix(name: str, value: str) -> None:
    if not isinstance(value, str):
        raise errors.InvalidInput(f"{name} must be a string")
    if len(value) > MAX_AFFIX_LENGTH:
        raise errors.InvalidInput(
            f"{name} may be at most {MAX_AFFIX_LENGTH} characters; got {len(value)}"
        )
    bad = sorted({c for c in value if c not in _LITERAL_CHARS})
    if bad:
        raise errors.InvalidInput(
            f"{name} may only hold A-Z, 0-9, '-' and '_' (upper-case); found {''.join(bad)!r}"
        )


def _validate_length(length: int, name: str = "length") -> None:
    if not isinstance(length, int) or isinstance(length, bool):
        raise errors.InvalidInput(f"{name} must be an integer")
    if not MIN_RANDOM_LENGTH <= length <= MAX_RANDOM_LENGTH:
        raise errors.InvalidInput(
            f"{name} must be between {MIN_RANDOM_LENGTH} and {MAX_RANDOM_LENGTH} random "
            f"characters; got {length}"
        )


class CodeSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The shape of a campaign's codes.

    ``length`` random characters from ``charset`` (resolved characters, not a name); with a
    ``pattern`` each ``#`` is a random character, the rest is literal, and ``length`` is the
    number of ``#``. The code is ``prefix + body + check character + postfix``. Build specs
    from user input with :meth:`create`, which resolves names and upper-cases; the
    constructor only accepts the canonical form (so decoded specs are validated too).
    """

    length: int = 10
    charset: str = DEFAULT_CHARSET
    pattern: str | None = None
    prefix: str = ""
    postfix: str = ""
    check_char: bool = False

    def __post_init__(self) -> None:
        _validate_spec(
            self.length, self.charset, self.pattern, self.prefix, self.postfix, self.check_char
        )

    @classmethod
    def create(
        cls,
        length: int | None = None,
        charset: str = "alphanumeric",
        pattern: str | None = None,
        prefix: str = "",
        postfix: str = "",
        check_char: bool = False,
    ) -> CodeSpec:
        """Validate user input and build a spec. Charset names are resolved; charset,
        pattern, prefix and postfix are upper-cased. With a pattern, ``length`` may be
        omitted (it is the number of ``#``). Raises :class:`~engine.errors.InvalidInput`
        naming the offending field."""
        chars = resolve_charset(charset)
        if pattern is not None:
            if not isinstance(pattern, str):
                raise errors.InvalidInput("pattern must be a string such as 'SALE-####-####'")
            pattern = pattern.upper()
            _validate_pattern(pattern)
            slots = pattern.count(PLACEHOLDER)
            if length is not None and length != slots:
                raise errors.InvalidInput(
                    f"length ({length}) must equal the number of '#' in pattern ({slots}), "
                    f"or be omitted"
                )
            length = slots
        elif length is None:
            length = 10
        for name, value in (("prefix", prefix), ("postfix", postfix)):
            if not isinstance(value, str):
                raise errors.InvalidInput(f"{name} must be a string")
        if not isinstance(check_char, bool):
            raise errors.InvalidInput("check_char must be true or false")
        return cls(
            length=length,
            charset=chars,
            pattern=pattern,
            prefix=prefix.upper(),
            postfix=postfix.upper(),
            check_char=check_char,
        )

    # --- derived facts ------------------------------------------------------------------

    @property
    def charset_size(self) -> int:
        return len(self.charset)

    @property
    def code_length(self) -> int:
        """Characters in a full code: prefix, body, check character and postfix."""
        return _compile(self).code_length

    @property
    def code_space(self) -> int:
        """Distinct codes this spec can produce: ``charset_size ** length``."""
        space: int = len(self.charset) ** self.length
        return space

    # --- building and well-formedness -------------------------------------------------

    def build(self, random_chars: str) -> str:
        """The full code for the given random characters: pattern filled, prefix, check
        character and postfix added (e.g. to import codes made elsewhere). Raises
        :class:`~engine.errors.InvalidInput` for a wrong count or foreign characters."""
        return _compile(self).build(random_chars)

    def check(self, code: str) -> str:
        """Return the normalised code, or raise :class:`~engine.errors.MalformedCode`
        saying what is wrong (length, charset, literal parts, check character). Catches
        typos without a lookup."""
        return _compile(self).check(code)

    def verify(self, code: str) -> bool:
        """Whether ``code`` (normalised first) is well-formed for this spec, check
        character included."""
        try:
            _compile(self).check(code)
        except errors.MalformedCode:
            return False
        return True

    def is_well_formed(self, code: str) -> bool:
        """Same as :meth:`verify`."""
        return self.verify(code)


def _validate_pattern(pattern: str) -> None:
    bad = sorted({c for c in pattern if c != PLACEHOLDER and c not in _LITERAL_CHARS})
    if bad:
        raise errors.InvalidInput(
            f"pattern may only hold '#' (a random character) and literal A-Z, 0-9, '-', '_'; "
            f"found {''.join(bad)!r}"
        )
    slots = pattern.count(PLACEHOLDER)
    if not MIN_RANDOM_LENGTH <= slots <= MAX_RANDOM_LENGTH:
        raise errors.InvalidInput(
            f"pattern must have between {MIN_RANDOM_LENGTH} and {MAX_RANDOM_LENGTH} '#' "
            f"(random characters); got {slots}"
        )


@functools.lru_cache(maxsize=1024)
def _validate_spec(
    length: int, charset: str, pattern: str | None, prefix: str, postfix: str, check_char: bool
) -> None:
    _validate_length(length)
    if not isinstance(charset, str):
        raise errors.InvalidInput("charset must be a string")
    if charset != charset.upper():
        raise errors.InvalidInput(
            "charset must be upper-case resolved characters; use CodeSpec.create for names "
            "and lower-case input"
        )
    _validate_charset(charset)
    if pattern is not None:
        if not isinstance(pattern, str):
            raise errors.InvalidInput("pattern must be a string such as 'SALE-####-####'")
        _validate_pattern(pattern)
        if pattern.count(PLACEHOLDER) != length:
            raise errors.InvalidInput(
                f"length ({length}) must equal the number of '#' in pattern "
                f"({pattern.count(PLACEHOLDER)}); CodeSpec.create derives it"
            )
    _validate_affix("prefix", prefix)
    _validate_affix("postfix", postfix)
    if not isinstance(check_char, bool):
        raise errors.InvalidInput("check_char must be true or false")
    if check_char and _check_scheme_kind(len(charset)) is None:
        raise errors.InvalidInput(
            f"check_char needs a charset whose size is odd, a multiple of 4, or 10; this "
            f"charset has {len(charset)} characters (add or remove one)"
        )


# --- check character ------------------------------------------------------------------

_GF_POLY: Final[dict[int, int]] = {  # irreducible polynomials for GF(2^k), 2 <= k <= 6
    4: 0b111,
    8: 0b1011,
    16: 0b10011,
    32: 0b100101,
    64: 0b1000011,
}

_DAMM10: Final = (
    (0, 3, 1, 7, 5, 9, 8, 6, 4, 2),
    (7, 0, 9, 2, 1, 5, 4, 8, 6, 3),
    (4, 2, 0, 6, 8, 7, 1, 3, 5, 9),
    (1, 7, 5, 0, 9, 8, 3, 4, 2, 6),
    (6, 1, 2, 3, 0, 4, 5, 9, 7, 8),
    (3, 6, 7, 4, 2, 0, 9, 5, 8, 1),
    (5, 8, 6, 9, 7, 2, 0, 1, 3, 4),
    (8, 9, 4, 5, 3, 6, 2, 0, 1, 7),
    (9, 4, 3, 8, 6, 1, 7, 2, 0, 5),
    (2, 5, 8, 1, 4, 3, 6, 7, 9, 0),
)


def _check_scheme_kind(n: int) -> str | None:
    if n == 10:
        return "damm"
    if n % 2 == 1 or n % 4 == 0:
        return "weighted" if n <= 256 else None
    return None


def _gf_mul(a: int, b: int, size: int) -> int:
    poly = _GF_POLY[size]
    out = 0
    while b:
        if b & 1:
            out ^= a
        b >>= 1
        a <<= 1
        if a & size:
            a ^= poly
    return out


def _split_pow2(n: int) -> tuple[int, int]:
    """``n = two * odd`` with ``two`` a power of two."""
    two = 1
    while n % 2 == 0:
        n //= 2
        two *= 2
    return two, n


class _Compiled:
    """Per-spec precomputed tables; built once per spec (cached)."""

    def __init__(self, spec: CodeSpec) -> None:
        self.spec = spec
        self.charset = spec.charset
        self.n_chars = k = len(spec.charset)
        self.length = spec.length
        self.charset_set = frozenset(spec.charset)
        self.index = {c: i for i, c in enumerate(spec.charset)}
        cs = spec.charset.encode("ascii")

        # Generator: byte b < limit maps to charset[b % k]; bytes >= limit are deleted, so
        # every character is equally likely (unbiased rejection sampling in C).
        limit = 256 // k * k
        self.accept_ratio = limit / 256
        self.gen_table = bytes(cs[b % k] for b in range(256))
        self.gen_delete = bytes(range(limit, 256))

        body = spec.pattern if spec.pattern is not None else PLACEHOLDER * spec.length
        check_slot = "?" if spec.check_char else ""
        template = spec.prefix + body + check_slot + spec.postfix
        self.code_length = len(template)
        self.body_start = len(spec.prefix)
        self.body = body
        self.random_positions = [i for i, c in enumerate(template) if c == PLACEHOLDER]
        self.check_position = len(spec.prefix) + len(body) if spec.check_char else -1
        self.row = (template.replace("?", PLACEHOLDER) + "\n").encode("ascii")

        self.kind = _check_scheme_kind(k) if spec.check_char else None
        if self.kind is not None:
            self._build_check_tables(cs)

    # The check scheme, in terms of character indexes x_0..x_{L-1} and check x_L: the
    # weight class of position j is (L - j) % 2, so the check character has class 0.

    def _build_check_tables(self, cs: bytes) -> None:
        k = self.n_chars
        self.ident = bytes(range(256))
        if self.kind == "damm":
            self.to_index = bytes(self.index.get(chr(b), 0) for b in range(256))
            self.times10 = bytes((b * 10) % 256 for b in range(256))
            self.damm_flat = bytes(_DAMM10[b // 10][b % 10] if b < 100 else 0 for b in range(256))
            self.index_to_char = bytes(cs[b] if b < k else 0 for b in range(256))
            return
        two, odd = _split_pow2(k)
        self.two, self.odd = two, odd
        w_add = (1, 2)
        w_gf = (1, 2)  # 1 and the field element x
        self.add_tabs: list[list[int]] = []
        self.xor_tabs: list[list[int]] = []
        for cls in (0, 1):
            self.add_tabs.append([(w_add[cls] * (x % odd)) % odd for x in range(k)])
            self.xor_tabs.append(
                [_gf_mul(w_gf[cls], x % two, two) if two > 1 else 0 for x in range(k)]
            )
        # pair (g, r) -> index x with x % two == g and x % odd == r
        self.pair_to_index = {(x % two, x % odd): x for x in range(k)}
        # byte-wise tables for the bulk path
        self.add_btabs = [
            bytes(tab[self.index[chr(b)]] if chr(b) in self.index else 0 for b in range(256))
            for tab in self.add_tabs
        ]
        self.xor_btabs = [
            bytes(tab[self.index[chr(b)]] if chr(b) in self.index else 0 for b in range(256))
            for tab in self.xor_tabs
        ]
        self.mod_table = bytes(b % odd for b in range(256))
        self.neg_table = bytes((-b) % odd for b in range(256))
        self.g_scale = bytes((b * odd) % 256 for b in range(256))
        self.combine_table = bytes(
            cs[self.pair_to_index[(b // odd, b % odd)]] if b < k else 0 for b in range(256)
        )
        # how many columns may be summed byte-wise before a byte could overflow
        self.sum_batch = max(1, 255 // max(1, odd - 1)) if odd > 1 else 0

    def check_index(self, chars: str) -> int:
        """The check character's index for the random characters ``chars``."""
        if self.kind == "damm":
            state = 0
            for c in chars:
                state = _DAMM10[state][self.index[c]]
            return state
        n = len(chars)
        s = 0
        g = 0
        add0, add1 = self.add_tabs
        xor0, xor1 = self.xor_tabs
        for j, c in enumerate(chars):
            x = self.index[c]
            if (n - j) & 1:
                s += add1[x]
                g ^= xor1[x]
            else:
                s += add0[x]
                g ^= xor0[x]
        return self.pair_to_index[(g, (-s) % self.odd)]

    def bulk_check(self, chars: bytes, count: int) -> bytes:
        """Check characters (as charset bytes) for ``count`` codes laid out back to back
        in ``chars``; column-wise, with ints as byte vectors (no Python loop per code)."""
        L = self.length
        if self.kind == "damm":
            state = bytes(count)
            for i in range(L):
                col = chars[i::L].translate(self.to_index)
                mixed = int.from_bytes(state.translate(self.times10), "little") + int.from_bytes(
                    col, "little"
                )
                state = mixed.to_bytes(count, "little").translate(self.damm_flat)
            return state.translate(self.index_to_char)
        acc = 0
        pending = 0
        gacc = 0
        for i in range(L):
            col = chars[i::L]
            cls = (L - i) & 1
            if self.odd > 1:
                if pending == self.sum_batch:
                    acc = int.from_bytes(
                        acc.to_bytes(count, "little").translate(self.mod_table), "little"
                    )
                    pending = 1
                acc += int.from_bytes(col.translate(self.add_btabs[cls]), "little")
                pending += 1
            if self.two > 1:
                gacc ^= int.from_bytes(col.translate(self.xor_btabs[cls]), "little")
        r = acc.to_bytes(count, "little").translate(self.mod_table).translate(self.neg_table)
        g = gacc.to_bytes(count, "little").translate(self.g_scale)
        combined = (int.from_bytes(r, "little") + int.from_bytes(g, "little")).to_bytes(
            count, "little"
        )
        return combined.translate(self.combine_table)

    def build(self, random_chars: str) -> str:
        if not isinstance(random_chars, str):
            raise errors.InvalidInput("random_chars must be a string")
        chars = random_chars.upper()
        if len(chars) != self.length:
            raise errors.InvalidInput(
                f"random_chars must have {self.length} characters; got {len(chars)}"
            )
        bad = sorted({c for c in chars if c not in self.charset_set})
        if bad:
            raise errors.InvalidInput(
                f"random_chars has characters outside the charset: {''.join(bad)!r}"
            )
        spec = self.spec
        if spec.pattern is None:
            body = chars
        else:
            it = iter(chars)
            body = "".join(next(it) if t == PLACEHOLDER else t for t in spec.pattern)
        check = self.charset[self.check_index(chars)] if spec.check_char else ""
        return spec.prefix + body + check + spec.postfix

    def check(self, code: str) -> str:
        if not isinstance(code, str):
            raise errors.MalformedCode("code must be a string")
        c = normalize(code)
        spec = self.spec
        if len(c) != self.code_length:
            raise errors.MalformedCode(
                f"code has {len(c)} characters; codes of this campaign have {self.code_length}"
            )
        if not c.startswith(spec.prefix):
            raise errors.MalformedCode(f"code must start with {spec.prefix!r}")
        if spec.postfix and not c.endswith(spec.postfix):
            raise errors.MalformedCode(f"code must end with {spec.postfix!r}")
        start = self.body_start
        body = c[start : start + len(self.body)]
        if spec.pattern is None:
            rand = body
            for j, ch in enumerate(body):
                if ch not in self.charset_set:
                    raise errors.MalformedCode(
                        f"character {ch!r} at position {start + j + 1} is not allowed in "
                        f"these codes"
                    )
        else:
            picked: list[str] = []
            for j, (want, ch) in enumerate(zip(self.body, body)):
                if want == PLACEHOLDER:
                    if ch not in self.charset_set:
                        raise errors.MalformedCode(
                            f"character {ch!r} at position {start + j + 1} is not allowed in "
                            f"these codes"
                        )
                    picked.append(ch)
                elif ch != want:
                    raise errors.MalformedCode(
                        f"expected {want!r} at position {start + j + 1}, found {ch!r} "
                        f"(pattern {spec.pattern})"
                    )
            rand = "".join(picked)
        if spec.check_char:
            got = c[self.check_position]
            if got not in self.charset_set:
                raise errors.MalformedCode(
                    f"character {got!r} at position {self.check_position + 1} is not allowed "
                    f"in these codes"
                )
            if self.charset[self.check_index(rand)] != got:
                raise errors.MalformedCode("check character mismatch: the code has a typo")
        return c


@functools.lru_cache(maxsize=256)
def _compile(spec: CodeSpec) -> _Compiled:
    return _Compiled(spec)


# --- generation -----------------------------------------------------------------------


def _random_chars(compiled: _Compiled, count: int, random_bytes: RandomBytes) -> bytes:
    """``count`` uniformly random charset characters as ASCII bytes."""
    parts: list[bytes] = []
    have = 0
    while have < count:
        want = count - have
        draw = int(want / compiled.accept_ratio * 1.02) + 64
        raw = random_bytes(draw)
        if len(raw) != draw:
            raise ValueError(f"random_bytes({draw}) returned {len(raw)} bytes")
        got = bytes(raw).translate(compiled.gen_table, compiled.gen_delete)
        parts.append(got)
        have += len(got)
    joined = parts[0] if len(parts) == 1 else b"".join(parts)
    return joined[:count]


def generate(spec: CodeSpec, n: int, random_bytes: RandomBytes) -> list[str]:
    """``n`` random codes for ``spec`` (normalised; may repeat: callers dedupe, or use
    :func:`generate_unique`). ``random_bytes`` must be a CSPRNG such as ``os.urandom``."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise errors.InvalidInput(f"n must be a non-negative integer; got {n!r}")
    if n == 0:
        return []
    cc = _compile(spec)
    L = cc.length
    chars = _random_chars(cc, n * L, random_bytes)
    width = len(cc.row)
    out = bytearray(cc.row * n)
    for i, pos in enumerate(cc.random_positions):
        out[pos::width] = chars[i::L]
    if cc.kind is not None:
        out[cc.check_position :: width] = cc.bulk_check(chars, n)
    codes = out.decode("ascii").split("\n")
    codes.pop()  # the empty string after the last separator
    return codes


def generate_unique(
    spec: CodeSpec,
    n: int,
    random_bytes: RandomBytes,
    exclude: Container[str] = (),
) -> list[str]:
    """Exactly ``n`` distinct codes, none of them in ``exclude``. Draws more as needed;
    raises :class:`~engine.errors.InfeasibleGeneration` when the space is too small or
    repeated draws stop yielding new codes."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise errors.InvalidInput(f"n must be a non-negative integer; got {n!r}")
    space = spec.code_space
    if n > space:
        raise errors.InfeasibleGeneration(
            f"{n:,} distinct codes from a space of {space:,} ({spec.length} chars of "
            f"{spec.charset_size}) is impossible"
        )
    seen: dict[str, None] = {}
    stalls = 0
    while len(seen) < n:
        need = n - len(seen)
        batch = dict.fromkeys(generate(spec, max(need + need // 16, 64), random_bytes))
        before = len(seen)
        if not seen and not exclude:
            seen = batch
        else:
            fresh = [c for c in batch if c not in seen and c not in exclude]
            seen.update(dict.fromkeys(fresh))
        if len(seen) == before:
            stalls += 1
            if stalls >= 16:
                raise errors.InfeasibleGeneration(
                    f"could not find {need:,} more codes outside the existing ones after "
                    f"{stalls} rounds: the code space of {space:,} is (nearly) used up"
                )
        else:
            stalls = 0
    if len(seen) > n:
        return list(itertools.islice(seen, n))
    return list(seen)


# --- planning -------------------------------------------------------------------------


class GenerationPlan(msgspec.Struct, frozen=True):
    """What generating ``count`` more codes would mean for a spec's code space."""

    code_space: int
    count: int
    existing: int
    fill_ratio: float
    """``(existing + count) / code_space``."""
    expected_collisions: float
    """Draws expected to hit an already taken code while generating (then re-drawn)."""
    guess_hit_probability: float
    """Chance that one random well-formed guess is a live code."""
    feasible: bool
    reason: str | None = None
    min_length: int | None = None
    """The fewest random characters that would make the request feasible."""


def _min_length(k: int, total: int, max_fill: float, max_guess: float) -> int | None:
    for length in range(MIN_RANDOM_LENGTH, MAX_RANDOM_LENGTH + 1):
        space = k**length
        if total <= space * max_fill and total / space <= max_guess:
            return length
    return None


def plan(
    spec: CodeSpec,
    count: int,
    existing: int = 0,
    *,
    max_fill: float = DEFAULT_MAX_FILL,
    max_guess_probability: float = DEFAULT_MAX_GUESS_PROBABILITY,
    strict: bool = True,
) -> GenerationPlan:
    """Check that ``count`` new codes fit next to ``existing`` ones. Infeasible when the
    space would be more than ``max_fill`` full (generation slows, guessing gets easy) or a
    random guess would hit a live code with probability above ``max_guess_probability``.
    Raises :class:`~engine.errors.InfeasibleGeneration` (suggesting the length that would
    work) unless ``strict`` is false, in which case the plan says ``feasible=False``."""
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        raise errors.InvalidInput(f"count must be a positive integer; got {count!r}")
    if not isinstance(existing, int) or isinstance(existing, bool) or existing < 0:
        raise errors.InvalidInput(f"existing must be a non-negative integer; got {existing!r}")
    if not 0 < max_fill <= 1:
        raise errors.InvalidInput(f"max_fill must be in (0, 1]; got {max_fill!r}")
    if not 0 < max_guess_probability <= 1:
        raise errors.InvalidInput(
            f"max_guess_probability must be in (0, 1]; got {max_guess_probability!r}"
        )
    k = spec.charset_size
    space = spec.code_space
    total = existing + count
    fill = total / space
    # Draw i (0-based) lands on a taken code with probability (existing + i) / space.
    collisions = (count * existing + count * (count - 1) / 2) / space
    best = _min_length(k, total, max_fill, max_guess_probability)
    what = f"{count:,} codes" + (f" (plus {existing:,} existing)" if existing else "")
    where = f"a space of {space:,} ({spec.length} chars of {k})"
    unit = "random characters ('#' in the pattern)" if spec.pattern else "characters"
    if best is None:
        advice = f"even {MAX_RANDOM_LENGTH} {unit} are not enough; lower the count"
    else:
        advice = f"use at least {best} {unit}"
    reason: str | None = None
    if total > space:
        reason = f"{what} from {where} is impossible; {advice}"
    elif total > space * max_fill:
        reason = (
            f"{what} would fill {fill:.1%} of {where}, above the {max_fill:.0%} limit where "
            f"generation slows down and codes become guessable; {advice}"
        )
    elif fill > max_guess_probability:
        reason = (
            f"with {what} in {where}, a random guess hits a live code with probability "
            f"{fill:.2g}, above the limit of {max_guess_probability:.2g}; {advice}"
        )
    result = GenerationPlan(
        code_space=space,
        count=count,
        existing=existing,
        fill_ratio=fill,
        expected_collisions=collisions,
        guess_hit_probability=fill,
        feasible=reason is None,
        reason=reason,
        min_length=best,
    )
    if reason is not None and strict:
        raise errors.InfeasibleGeneration(reason)
    return result
