"""Rules for headless rule-driven steering (``steer-tui auto --rules RULES.toml``): the
rules file and how a rule matches streaming text. ``auto_run`` applies them to sessions;
``steer_tui.auto_cli`` is the command.

A rule (TOML, one ``[[rule]]`` table each)::

    [[rule]]
    name = "plain-words"
    pattern = '\\bvibrant\\b'     # Python regex over the response text
    action = "replace"            # replace | pick | stop | rewrite
    replace = "lively"            # replace: the correction text
    ignore_case = false           # optional
    scope = "sentence"            # rewrite: roll back to the start of the "sentence" or "clause"
    max_tokens = 20               # rewrite: length of the model-written correction

Matching while streaming: a match counts once at least one character follows it (so
``\\bvibrant\\b`` does not fire on the "vibrant" of "vibrantly") or the generation ended.
Human text is never matched again (matches must start after the last steer). For
``pick``, an alternative that would start the match again is refused
(:func:`alternative_ok`); for ``rewrite``, the matched words' tokens are banned
(:func:`banned_tokens`) from the start of the offending scope (:func:`scope_start`).
What each action does is described in ``auto_run``.
"""

from __future__ import annotations

import bisect
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACTIONS = ("replace", "pick", "stop", "rewrite")
SCOPES = ("sentence", "clause")
REWRITE_MAX_TOKENS = 20
#: The most tokens a rule may let the model write as one rewrite.
REWRITE_TOKEN_LIMIT = 256
_RULE_KEYS = {"name", "pattern", "action", "replace", "ignore_case", "description", "scope", "max_tokens"}


class RuleError(ValueError):
    """A rules file is unusable; the message names the file, the rule and the problem."""


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern[str]
    action: str
    replace: str | None = None
    scope: str = "sentence"
    """rewrite: roll back to the start of this ("sentence" or "clause")."""
    max_tokens: int = REWRITE_MAX_TOKENS
    """rewrite: at most this many model-written tokens in the correction."""

    @property
    def annotator(self) -> str:
        return f"auto:{self.name}"


def parse_rules(data: Any, source: str = "<rules>") -> list[Rule]:
    if not isinstance(data, dict) or set(data) - {"rule"}:
        extra = sorted(set(data) - {"rule"}) if isinstance(data, dict) else []
        raise RuleError(f"{source}: expected only [[rule]] tables{', found ' + ', '.join(extra) if extra else ''}")
    raw = data.get("rule")
    if not isinstance(raw, list) or not raw:
        raise RuleError(f"{source}: no [[rule]] tables")
    rules: list[Rule] = []
    names: set[str] = set()
    for i, r in enumerate(raw, start=1):
        where = f"{source}: rule {i}"
        if not isinstance(r, dict):
            raise RuleError(f"{where}: must be a table")
        name = r.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RuleError(f"{where}: needs a non-empty 'name'")
        where = f"{source}: rule {i} ({name!r})"
        unknown = sorted(set(r) - _RULE_KEYS)
        if unknown:
            raise RuleError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (known: {', '.join(sorted(_RULE_KEYS))})")
        if name in names:
            raise RuleError(f"{where}: the name is used by another rule")
        names.add(name)
        pattern = r.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise RuleError(f"{where}: needs a non-empty 'pattern' (a Python regex)")
        flags = re.IGNORECASE if r.get("ignore_case") else 0
        if not isinstance(r.get("ignore_case", False), bool):
            raise RuleError(f"{where}: 'ignore_case' must be true or false")
        try:
            compiled = re.compile(pattern, flags)
        except re.error as exc:
            raise RuleError(f"{where}: bad regex {pattern!r}: {exc}") from None
        if compiled.search("") is not None:
            raise RuleError(f"{where}: pattern {pattern!r} matches the empty string, so it would fire everywhere")
        action = r.get("action")
        if action not in ACTIONS:
            raise RuleError(f"{where}: 'action' is {action!r}, expected one of {', '.join(ACTIONS)}")
        replace = r.get("replace")
        if action == "replace":
            if not isinstance(replace, str) or not replace.strip():
                raise RuleError(f"{where}: action 'replace' needs a non-empty 'replace' text")
        elif replace is not None:
            raise RuleError(f"{where}: 'replace' is only for action 'replace'")
        scope, max_tokens = r.get("scope", "sentence"), r.get("max_tokens", REWRITE_MAX_TOKENS)
        if action != "rewrite" and ("scope" in r or "max_tokens" in r):
            raise RuleError(f"{where}: 'scope' and 'max_tokens' are only for action 'rewrite'")
        if scope not in SCOPES:
            raise RuleError(f"{where}: 'scope' is {scope!r}, expected one of {', '.join(SCOPES)}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= REWRITE_TOKEN_LIMIT:
            raise RuleError(
                f"{where}: 'max_tokens' must be an integer from 1 to {REWRITE_TOKEN_LIMIT}, got {max_tokens!r}"
            )
        rules.append(Rule(name=name, pattern=compiled, action=action, replace=replace, scope=scope, max_tokens=max_tokens))
    return rules


def load_rules(path: str | Path) -> list[Rule]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RuleError(f"--rules {p}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleError(f"--rules {p}: cannot read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(f"--rules {p}: not valid TOML: {exc}") from None
    return parse_rules(data, str(p))


# ---------------------------------------------------------------------------------------
# matching


@dataclass
class Hit:
    rule: Rule
    start: int  # character offset of the match in the response text
    end: int
    text: str


def find_hit(rules: list[Rule], text: str, protected: int, final: bool) -> Hit | None:
    """The earliest confirmed match starting at or after ``protected``.

    A match is confirmed when a character follows it or the text is ``final``. Among rules
    matching at the same place, the first rule in the file wins."""
    best: Hit | None = None
    for rule in rules:
        for m in rule.pattern.finditer(text, protected):
            if m.start() == m.end():
                continue
            if m.end() >= len(text) and not final:
                break  # may still grow or stop matching; later matches start even later
            if best is None or m.start() < best.start:
                best = Hit(rule, m.start(), m.end(), m.group(0))
            break
    return best


def token_at(starts: list[int], pos: int) -> int:
    """Index of the token whose text span holds character ``pos`` (``starts`` = char offset
    of each token; tokens with empty pieces share an offset and the first non-empty wins)."""
    i = bisect.bisect_right(starts, pos) - 1
    while i > 0 and starts[i - 1] == starts[i]:
        i -= 1
    return max(i, 0)


def alternative_ok(rule: Rule, before: str, piece: str, hit: Hit, token_start: int) -> bool:
    """May the model's alternative ``piece`` (replacing the token that starts at
    ``token_start``) be picked? Not if it starts the offending match again: its text from
    the match position is a prefix of the match (or the match is a prefix of it, case-folded
    when the rule ignores case), or the rule matches inside ``before + piece`` at or after
    the match start."""
    if not piece:
        return False
    offset = hit.start - token_start
    if piece[:offset] == before[token_start : hit.start] and len(piece) > offset:
        tail, match = piece[offset:], hit.text
        if rule.pattern.flags & re.IGNORECASE:
            tail, match = tail.casefold(), match.casefold()
        if match.startswith(tail) or tail.startswith(match):
            return False
    candidate = before[:token_start] + piece
    return not any(m.start() >= min(hit.start, token_start) for m in rule.pattern.finditer(candidate, token_start))


_BOUNDARY = {
    "sentence": re.compile(r"[.!?]+[\"')\]]*\s+|\n+"),
    "clause": re.compile(r"[.!?,;:]+[\"')\]]*\s+|\n+|\s+[-\u2013\u2014]+\s+"),
}
_WORD = re.compile(r"\w+")
BAN_MIN_CHARS = 3


def scope_start(text: str, pos: int, protected: int, scope: str) -> int:
    """Character offset where the sentence (or clause) holding ``pos`` starts: just after
    the last boundary (end punctuation and the spaces after it, or a line break) that ends
    at or before ``pos``, and never before ``protected`` (text up to the last steer)."""
    start = protected
    for m in _BOUNDARY[scope].finditer(text, protected, pos):
        start = m.end()
    return start


def banned_tokens(token_texts: list[str], matched: str, min_chars: int = BAN_MIN_CHARS) -> set[int]:
    """Token ids that would start one of the matched words again, in any tokenisation and
    case: every token whose text, stripped of surrounding spaces and punctuation and case
    folded, is a piece of at least ``min_chars`` characters (or the whole word) that begins
    the word, or begins with the word (for words of ``min_chars`` or more: "vibrantly")."""
    words = {w.casefold() for w in _WORD.findall(matched)}
    banned: set[int] = set()
    if not words:
        return banned
    for tid, piece in enumerate(token_texts):
        core = piece.strip().strip(".,;:!?\"'()[]").casefold()
        if not core:
            continue
        for w in words:
            if (w.startswith(core) and len(core) >= min(min_chars, len(w))) or (len(w) >= min_chars and core.startswith(w)):
                banned.add(tid)
                break
    return banned
