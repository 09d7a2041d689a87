"""A deterministic meter of the work the rewards do, for the tests that bound it (no clocks).

Seconds measured on a shared machine are noise; these units are the same on every machine and every
run, so a test can bound them exactly. `Meter` counts three things while it is installed:

- lines: Python lines executed in `vrft_jax/rewards` (`sys.settrace`), so a loop is seen;
- regex_steps: the steps of every regular-expression call made by the reward modules, through their
  compiled patterns or their `re` module, counted by `RegexModel`, a backtracking matcher that walks
  the pattern's own parse tree as `re` does (greedy repeats take all they can and give back one at a
  time, lazy ones take one more at a time, alternatives are tried in order). Each of its results is
  checked against `re`'s, so the count is that of a search that finds exactly what `re` finds. `re`
  makes the same choices in the same order and skips some (it scans for a literal prefix, stops
  short of the end by the pattern's minimum length), so a bound on the model's steps bounds `re`'s
  work up to a constant factor;
- chars: characters that `str` methods scan or copy on a `Metered` text (find, count, slicing,
  strip, replace, ...) and on every `Metered` string derived from it.

Not counted: C code working on plain strings (json.loads, unicodedata, casefold on a copy) and NumPy,
which are linear in their input; a loop calling them is still seen in `lines`.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import re
import sys
from collections.abc import Callable, Iterator

import vrft_jax.rewards

try:
    from re import _constants as C
    from re import _parser
except ImportError:  # Python 3.10
    import sre_constants as C
    import sre_parse as _parser

REWARDS_DIR = os.path.dirname(os.path.abspath(vrft_jax.rewards.__file__)) + os.sep
_SINGLE = (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN)
_POSSESSIVE_REPEAT = getattr(C, "POSSESSIVE_REPEAT", object())  # Python 3.11+, as is ATOMIC_GROUP
_ATOMIC_GROUP = getattr(C, "ATOMIC_GROUP", object())


class Unsupported(Exception):
    """A regex construct the model does not implement (a test must not silently miss its work)."""


@dataclasses.dataclass
class Work:
    lines: int = 0
    regex_steps: int = 0
    chars: int = 0

    def items(self):
        return dataclasses.asdict(self).items()


# --- Regular expressions ---------------------------------------------------------------------


class RegexModel:
    """Counts the steps of a backtracking search for `pattern`; `steps` accumulates over calls.

    One step per character tested, per node entered, and per position a repeat gives back or a
    search tries.
    """

    def __init__(self, pattern: re.Pattern):
        if isinstance(pattern.pattern, bytes):
            raise Unsupported("bytes patterns")
        self.pattern = pattern
        tree = _parser.parse(pattern.pattern, pattern.flags)
        self.flags = tree.state.flags
        self.tree = _plain(tree)
        self.steps = 0

    # Characters.

    def _category(self, category, ch: str) -> bool:
        ascii_only = bool(self.flags & re.ASCII)
        name = str(category)
        negate = "_NOT_" in name
        if name.endswith("DIGIT"):
            hit = ("0" <= ch <= "9") if ascii_only else ch.isdecimal()
        elif name.endswith("SPACE"):
            hit = ch in " \t\n\r\f\v" if ascii_only else ch.isspace()
        elif name.endswith("WORD"):
            hit = (ch.isascii() or not ascii_only) and (ch.isalnum() or ch == "_")
        else:
            raise Unsupported(f"category {name}")
        return hit != negate

    def _same(self, code: int, ch: str) -> bool:
        lit = chr(code)
        if self.flags & re.IGNORECASE:
            return ch.lower() == lit.lower() or ch.upper() == lit.upper()
        return ch == lit

    def _in_set(self, items, ch: str) -> bool:
        negate, hit = False, False
        for op, av in items:
            if op is C.NEGATE:
                negate = True
            elif op is C.LITERAL:
                hit = self._same(av, ch)
            elif op is C.RANGE:
                lo, hi = av
                hit = lo <= ord(ch) <= hi or (
                    bool(self.flags & re.IGNORECASE)
                    and any(lo <= ord(c) <= hi for c in (ch.lower(), ch.upper()) if len(c) == 1)
                )
            elif op is C.CATEGORY:
                hit = self._category(av, ch)
            else:
                raise Unsupported(f"set item {op}")
            if hit:
                break
        return hit != negate

    def _char(self, op, av, ch: str) -> bool:
        self.steps += 1
        if op is C.LITERAL:
            return self._same(av, ch)
        if op is C.NOT_LITERAL:
            return not self._same(av, ch)
        if op is C.ANY:
            return bool(self.flags & re.DOTALL) or ch != "\n"
        return self._in_set(av, ch)

    # Sequences, continuation-passing: `k(end)` is the rest of the match; it returns the match's end or None.

    def _seq(self, s: str, n: int, items: list, idx: int, i: int, k: Callable[[int], int | None]) -> int | None:
        while idx < len(items) and items[idx][0] in _SINGLE:  # single characters need no backtracking
            op, av = items[idx]
            if i >= n or not self._char(op, av, s[i]):
                return None
            i, idx = i + 1, idx + 1
        if idx == len(items):
            return k(i)
        op, av = items[idx]
        self.steps += 1

        def rest(j: int) -> int | None:
            return self._seq(s, n, items, idx + 1, j, k)

        if op is C.SUBPATTERN:
            _group, add_flags, del_flags, body = av
            if add_flags or del_flags:
                raise Unsupported("inline flags")
            return self._seq(s, n, body, 0, i, rest)
        if op is _ATOMIC_GROUP:
            end = self._seq(s, n, av, 0, i, lambda j: j)
            return None if end is None else rest(end)
        if op is C.BRANCH:
            for alternative in av[1]:
                end = self._seq(s, n, alternative, 0, i, rest)
                if end is not None:
                    return end
            return None
        if op in (C.MAX_REPEAT, C.MIN_REPEAT, _POSSESSIVE_REPEAT):
            return self._repeat(s, n, op, av, i, rest)
        if op is C.AT:
            return rest(i) if self._at(av, s, n, i) else None
        if op in (C.ASSERT, C.ASSERT_NOT):
            direction, body = av
            if direction != 1:
                raise Unsupported("lookbehind")
            found = self._seq(s, n, body, 0, i, lambda j: j) is not None
            return rest(i) if found == (op is C.ASSERT) else None
        raise Unsupported(f"regex node {op}")

    def _at(self, where, s: str, n: int, i: int) -> bool:
        if where in (C.AT_BEGINNING, C.AT_BEGINNING_STRING) and not self.flags & re.MULTILINE:
            return i == 0
        if where is C.AT_END and not self.flags & re.MULTILINE:
            return i == n or (i == n - 1 and s[i] == "\n")
        if where is C.AT_END_STRING:
            return i == n
        raise Unsupported(f"anchor {where}")

    def _repeat(self, s, n, op, av, i, rest) -> int | None:
        lo, hi, body = av
        hi = sys.maxsize if hi is C.MAXREPEAT else hi
        if len(body) == 1 and body[0][0] in _SINGLE:
            (cop, cav), = body
            if op is C.MIN_REPEAT:  # lazy: the rest first, then one character more
                count = 0
                while count < lo:
                    if i + count >= n or not self._char(cop, cav, s[i + count]):
                        return None
                    count += 1
                while True:
                    self.steps += 1
                    end = rest(i + count)
                    if end is not None:
                        return end
                    if count >= hi or i + count >= n or not self._char(cop, cav, s[i + count]):
                        return None
                    count += 1
            count = 0  # greedy or possessive: take all, then give back one at a time
            while count < hi and i + count < n and self._char(cop, cav, s[i + count]):
                count += 1
            if count < lo:
                return None
            if op is _POSSESSIVE_REPEAT:
                return rest(i + count)
            for c in range(count, lo - 1, -1):
                self.steps += 1
                end = rest(i + c)
                if end is not None:
                    return end
            return None

        def iterate(count: int, j: int) -> int | None:
            self.steps += 1

            def again(e: int) -> int | None:
                return None if e == j and count >= lo else iterate(count + 1, e)  # no empty loops

            if op is C.MIN_REPEAT:
                if count >= lo:
                    end = rest(j)
                    if end is not None:
                        return end
                return self._seq(s, n, body, 0, j, again) if count < hi else None
            if op is _POSSESSIVE_REPEAT:
                raise Unsupported("possessive repeat of a group")
            if count < hi:
                end = self._seq(s, n, body, 0, j, again)
                if end is not None:
                    return end
            return rest(j) if count >= lo else None

        return iterate(0, i)

    # Calls.

    def match(self, s: str, pos: int, endpos: int, full: bool = False) -> tuple[int, int] | None:
        self.steps += 1
        end = self._seq(s, endpos, self.tree, 0, pos, (lambda j: j if j == endpos else None) if full else (lambda j: j))
        return None if end is None else (pos, end)

    def search(self, s: str, pos: int, endpos: int, nonempty_at: int = -1) -> tuple[int, int] | None:
        for start in range(pos, endpos + 1):
            self.steps += 1
            k = (lambda j: None if j == start else j) if start == nonempty_at else (lambda j: j)
            end = self._seq(s, endpos, self.tree, 0, start, k)
            if end is not None:
                return start, end
        return None

    def spans(self, s: str, pos: int, endpos: int) -> Iterator[tuple[int, int]]:
        """The spans of finditer, lazily: a caller that stops early leaves the rest unsearched."""
        nonempty_at = -1
        while pos <= endpos:
            span = self.search(s, pos, endpos, nonempty_at)
            if span is None:
                return
            yield span
            pos = span[1]
            nonempty_at = pos if span[0] == span[1] else -1


def _plain(items) -> list:
    """The parse tree as lists, made once (the parser's SubPattern objects are slow to walk)."""
    out = []
    for op, av in items:
        if op is C.SUBPATTERN:
            av = (av[0], av[1], av[2], _plain(av[3]))
        elif op is C.BRANCH:
            av = (av[0], [_plain(alternative) for alternative in av[1]])
        elif op in (C.MAX_REPEAT, C.MIN_REPEAT, _POSSESSIVE_REPEAT):
            av = (av[0], av[1], _plain(av[2]))
        elif op in (C.ASSERT, C.ASSERT_NOT):
            av = (av[0], _plain(av[1]))
        elif op is _ATOMIC_GROUP:
            av = _plain(av)
        out.append((op, av))
    return out


def _bounds(string: str, pos: int, endpos: int) -> tuple[int, int]:
    n = len(string)
    pos = min(max(pos, 0), n)
    return pos, max(pos, min(endpos, n))


class MeteredPattern:
    """A compiled pattern whose calls return `re`'s results and add the model's steps to a meter."""

    def __init__(self, real: re.Pattern, meter: Meter):
        self._real, self._meter, self._model = real, meter, RegexModel(real)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def _count(self, fn, *args):
        before = self._model.steps
        with self._meter.untraced():
            result = fn(*args)
        self._meter.work.regex_steps += self._model.steps - before
        return result

    def _check(self, real, span, what: str) -> None:
        if (None if real is None else real.span()) != span:
            raise AssertionError(f"regex model disagrees with re on {what} of {self._real.pattern!r}: "
                                 f"{span} != {None if real is None else real.span()}")

    def _single(self, kind: str, string: str, pos: int, endpos: int):
        real = getattr(self._real, kind)(string, pos, endpos)
        plain = str(string)
        p, e = _bounds(plain, pos, endpos)
        if kind == "search":
            span = self._count(self._model.search, plain, p, e)
        else:
            span = self._count(self._model.match, plain, p, e, kind == "fullmatch")
        self._check(real, span, kind)
        return real

    def search(self, string, pos=0, endpos=sys.maxsize):
        return self._single("search", string, pos, endpos)

    def match(self, string, pos=0, endpos=sys.maxsize):
        return self._single("match", string, pos, endpos)

    def fullmatch(self, string, pos=0, endpos=sys.maxsize):
        return self._single("fullmatch", string, pos, endpos)

    def finditer(self, string, pos=0, endpos=sys.maxsize):
        plain = str(string)
        spans = self._model.spans(plain, *_bounds(plain, pos, endpos))
        for real in self._real.finditer(string, pos, endpos):
            self._check(real, self._count(next, spans, None), "finditer")
            yield real
        self._check(None, self._count(next, spans, None), "finditer's end")

    def findall(self, string, pos=0, endpos=sys.maxsize):
        for _ in self.finditer(string, pos, endpos):
            pass
        return self._real.findall(string, pos, endpos)

    def sub(self, repl, string, count=0):
        return self.subn(repl, string, count)[0]

    def subn(self, repl, string, count=0):
        for k, _ in enumerate(self.finditer(string), 1):
            if k == count:
                break
        return self._real.subn(repl, string, count)

    def split(self, string, maxsplit=0):
        for k, _ in enumerate(self.finditer(string), 1):
            if k == maxsplit:
                break
        return self._real.split(string, maxsplit)


class _MeteredRe:
    """The `re` module as the reward modules see it while metered: its functions use MeteredPattern."""

    def __init__(self, meter: Meter):
        self._meter = meter

    def __getattr__(self, name):
        return getattr(re, name)

    def compile(self, pattern, flags=0):
        return MeteredPattern(re.compile(pattern, flags), self._meter)

    def _call(name):  # noqa: N805 - builds the module-level functions
        def call(self, pattern, string, *args, flags=0):
            return getattr(self.compile(pattern, flags), name)(string, *args)
        return call

    search, match, fullmatch = _call("search"), _call("match"), _call("fullmatch")
    finditer, findall, split = _call("finditer"), _call("findall"), _call("split")
    del _call

    def sub(self, pattern, repl, string, count=0, flags=0):
        return self.compile(pattern, flags).sub(repl, string, count)

    def subn(self, pattern, repl, string, count=0, flags=0):
        return self.compile(pattern, flags).subn(repl, string, count)


# --- Strings -----------------------------------------------------------------------------------


_ACTIVE: list[Meter] = []


def _charge(n: int) -> None:
    if _ACTIVE:
        _ACTIVE[-1].work.chars += n


def _span(length: int, start, end) -> tuple[int, int]:
    return slice(start, end).indices(length)[:2]


class Metered(str):
    """A str whose scans and copies are counted by the installed Meter; what it derives is Metered too."""

    def find(self, sub, start=None, end=None):
        i = str.find(self, sub, start, end)
        lo, hi = _span(len(self), start, end)
        _charge((i + len(sub) - lo) if i >= 0 else max(hi - lo, 0))
        return i

    def rfind(self, sub, start=None, end=None):
        i = str.rfind(self, sub, start, end)
        lo, hi = _span(len(self), start, end)
        _charge((hi - i) if i >= 0 else max(hi - lo, 0))
        return i

    def index(self, sub, start=None, end=None):
        i = self.find(sub, start, end)
        if i < 0:
            raise ValueError("substring not found")
        return i

    def rindex(self, sub, start=None, end=None):
        i = self.rfind(sub, start, end)
        if i < 0:
            raise ValueError("substring not found")
        return i

    def __contains__(self, sub):
        return self.find(sub) >= 0

    def count(self, sub, start=None, end=None):
        lo, hi = _span(len(self), start, end)
        _charge(max(hi - lo, 0))
        return str.count(self, sub, start, end)

    def startswith(self, prefix, *args):
        _charge(max(map(len, prefix)) if isinstance(prefix, tuple) else len(prefix))
        return str.startswith(self, prefix, *args)

    def endswith(self, suffix, *args):
        _charge(max(map(len, suffix)) if isinstance(suffix, tuple) else len(suffix))
        return str.endswith(self, suffix, *args)

    def _derived(self, result, scanned: int):
        if isinstance(result, str):
            _charge(scanned + len(result))
            return Metered(result)
        _charge(scanned + sum(map(len, result)))
        return [Metered(part) for part in result]

    def __getitem__(self, key):
        return self._derived(str.__getitem__(self, key), 0)

    def __add__(self, other):
        return self._derived(str.__add__(self, other), 0)

    def __radd__(self, other):
        return self._derived(str.__add__(other, self), 0)

    def _stripping(name):  # noqa: N805
        def strip(self, chars=None):
            result = getattr(str, name)(self, chars)
            return self._derived(result, len(self) - len(result) + 1)
        return strip

    strip, lstrip, rstrip = _stripping("strip"), _stripping("lstrip"), _stripping("rstrip")

    def _whole(name):  # noqa: N805
        def method(self, *args, **kwargs):
            return self._derived(getattr(str, name)(self, *args, **kwargs), len(self))
        return method

    replace, lower, upper, casefold = _whole("replace"), _whole("lower"), _whole("upper"), _whole("casefold")
    split, rsplit, splitlines = _whole("split"), _whole("rsplit"), _whole("splitlines")
    del _stripping, _whole

    def partition(self, sep):
        return tuple(self._derived(list(str.partition(self, sep)), len(self)))

    def rpartition(self, sep):
        return tuple(self._derived(list(str.rpartition(self, sep)), len(self)))


# --- The meter -----------------------------------------------------------------------------------


def _reward_modules() -> list:
    names = [f"vrft_jax.rewards.{m.name}" for m in pkgutil.iter_modules(vrft_jax.rewards.__path__)]
    return [vrft_jax.rewards] + [importlib.import_module(name) for name in names]


class Meter:
    """`with Meter() as meter: ...` counts the work of the rewards called inside into `meter.work`.

    Installs MeteredPattern over every compiled pattern in the reward modules (and a metered `re`),
    a line tracer for their files, and the `Metered` string charge; removes them all on exit.
    """

    def __init__(self):
        self.work = Work()
        self._saved: list[tuple[object, str, object]] = []
        self._files: dict[object, bool] = {}
        self._previous_trace = None

    def __enter__(self) -> Meter:
        for module in _reward_modules():
            for name, value in list(vars(module).items()):
                if isinstance(value, re.Pattern):
                    self._replace(module, name, MeteredPattern(value, self))
                elif value is re:
                    self._replace(module, name, _MeteredRe(self))
        _ACTIVE.append(self)
        self._previous_trace = sys.gettrace()
        sys.settrace(self._trace)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(self._previous_trace)
        _ACTIVE.remove(self)
        for module, name, value in reversed(self._saved):
            setattr(module, name, value)
        self._saved.clear()

    def _replace(self, module, name: str, value) -> None:
        self._saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    def _trace(self, frame, event, arg):
        code = frame.f_code
        inside = self._files.get(code)
        if inside is None:
            inside = self._files[code] = code.co_filename.startswith(REWARDS_DIR)
        return self._line if inside else None

    def _line(self, frame, event, arg):
        if event == "line":
            self.work.lines += 1
        return self._line

    def untraced(self):
        """A context in which new frames are not traced (the model's own calls are not the rewards')."""
        meter = self

        class _Untraced:
            def __enter__(self):
                sys.settrace(None)

            def __exit__(self, *exc):
                sys.settrace(meter._trace)

        return _Untraced()


def measure(fn: Callable[[], object]) -> Work:
    """The work of `fn()`."""
    with Meter() as meter:
        fn()
    return meter.work
