"""Headless rule-driven steering: ``steer-tui auto --rules RULES.toml --tasks FILE.jsonl``.

Rules are checked while tokens stream, so a steer happens at the first offending token, as a
person watching would have done it, and the result is an ordinary steer tree (annotator
``auto:<rule name>``).

A rule (TOML, one ``[[rule]]`` table each)::

    [[rule]]
    name = "plain-words"
    pattern = '\\bvibrant\\b'     # Python regex over the response text
    action = "replace"            # replace | pick | stop | rewrite
    replace = "lively"            # replace: the correction text
    ignore_case = false           # optional
    scope = "sentence"            # rewrite: roll back to the start of the "sentence" or "clause"
    max_tokens = 20               # rewrite: length of the model-written correction

Actions, at the token where the match starts:
- ``replace``: roll back to that token and type the text of that token before the match
  plus ``replace`` (a ``correction`` steer); generation continues after it.
- ``pick``: roll back to that token and pick the model's best top-k alternative that does
  not start the match again (a ``pick`` steer).
- ``stop``: roll back to that token and pick end-of-sequence there (a ``pick`` steer whose
  chosen token is EOS); the sample ends.
- ``rewrite``: roll back to the start of the offending ``scope`` (the sentence or clause
  holding the match, never before the last steer), let the model write up to
  ``max_tokens`` tokens there with the matched words' tokens banned (every token whose text
  is a piece of at least three characters of the word, in any case), and record that text
  as a ``correction`` steer (annotator ``auto:<rule name>``; the cut text is the rejected
  side); generation continues after it. A 10-20 token rewrite is the kind of steer people
  make; an on-policy one (written by the model itself) is the kind Step-DPO found best.

Matching while streaming: a match counts once at least one character follows it (so
``\\bvibrant\\b`` does not fire on the "vibrant" of "vibrantly") or the generation ended.
Human text is never matched again (matches must start after the last steer). A rule that
cannot be satisfied (no acceptable alternative, or the same token position steered
``max_attempts`` times) ends the sample with a message instead of looping.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from steer_tui.core.tasks import TaskSpec, load_task_queue

ACTIONS = ("replace", "pick", "stop", "rewrite")
SCOPES = ("sentence", "clause")
REWRITE_MAX_TOKENS = 20
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
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 256:
            raise RuleError(f"{where}: 'max_tokens' must be an integer from 1 to 256, got {max_tokens!r}")
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
    import bisect

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


def write_rewrite(
    engine: Any,
    context: list[int],
    sampling: Any,
    banned: set[int],
    max_tokens: int,
    rng: Any,
) -> list[int]:
    """Let the model write up to ``max_tokens`` tokens after ``context`` with ``banned`` ids
    masked out (their logits set to -inf before sampling); stops before an EOS token."""
    import numpy as np

    from steer_tui.core.engine import sample_token

    ban = np.fromiter(sorted(banned), dtype=np.int64, count=len(banned))
    ctx = list(context)
    out: list[int] = []
    while len(out) < max_tokens and len(ctx) < engine.n_ctx:
        row = np.array(engine.logits(ctx), dtype=np.float32)
        row[ban] = -np.inf
        tok = sample_token(row, sampling, rng, ctx)
        if engine.is_eos(tok):
            break
        out.append(tok)
        ctx.append(tok)
    return out


def _token_texts(engine: Any) -> list[str]:
    return [b.decode("utf-8", errors="ignore") for b in engine.all_token_bytes()]


# ---------------------------------------------------------------------------------------
# steering one sample


@dataclass
class SampleReport:
    task: str
    steers: int = 0
    model_tokens: int = 0
    response_tokens: int = 0
    end: str | None = None
    by_rule: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    text: str = ""


def steer_sample(
    session: Any,
    rules: list[Rule],
    *,
    max_tokens: int,
    max_attempts: int = 3,
    max_steers: int = 64,
    on_event: Callable[[str], None] | None = None,
) -> SampleReport:
    """Generate from the session's current position, steering with ``rules`` as tokens
    stream, until the model stops or ``max_tokens`` model tokens were generated."""
    report = SampleReport(task=session.task_id)
    view = session.tokens_view()
    pieces = [t.text for t in view]
    protected = len("".join(pieces))
    attempts: dict[tuple[str, int], int] = {}
    eos = int(session.engine.eos_ids[0]) if session.engine.eos_ids else None
    token_texts: list[str] | None = None  # the vocabulary as text, for rewrite bans

    while report.model_tokens < max_tokens:
        stop = threading.Event()
        hit: Hit | None = None
        text = "".join(pieces)
        for tok in session.generate(max_tokens=max_tokens - report.model_tokens, stop=stop):
            report.model_tokens += 1
            pieces.append(tok.text)
            text += tok.text
            if tok.text and hit is None:
                hit = find_hit(rules, text, protected, final=False)
                if hit is not None:
                    stop.set()
        ended = session.last_end
        if hit is None:
            hit = find_hit(rules, text, protected, final=True)
        if hit is None:
            report.end = ended
            break
        starts, acc = [], 0
        for p in pieces:
            starts.append(acc)
            acc += len(p)
        i = token_at(starts, hit.start)
        key = (hit.rule.name, i)
        attempts[key] = attempts.get(key, 0) + 1
        if attempts[key] > max_attempts or report.steers >= max_steers:
            msg = (
                f"rule {hit.rule.name!r} still matches {hit.text!r} at token {i} after {max_attempts} attempts; "
                "giving up on this sample"
                if attempts[key] > max_attempts
                else f"more than {max_steers} steers in one sample; giving up on it"
            )
            report.messages.append(msg)
            report.end = "gave-up"
            break
        rewrite: str | None = None
        if hit.rule.action == "rewrite":
            if token_texts is None:
                token_texts = _token_texts(session.engine)
            i, rewrite, why = _rewrite(session, hit, text, pieces, starts, protected, token_texts,
                                       attempt=report.steers, tries=max_attempts)
            if rewrite is None:
                report.messages.append(f"rule {hit.rule.name!r}: {why}; giving up on this sample")
                report.end = "gave-up"
                break
        before = "".join(pieces[:i])
        token_prefix = text[starts[i] : hit.start]
        session.rollback(i)
        pieces = pieces[:i]
        session.annotator = hit.rule.annotator
        if rewrite is not None:
            node = session.correct(rewrite)
        elif hit.rule.action == "replace":
            node = session.correct(token_prefix + (hit.rule.replace or ""))
        else:
            chosen = None
            if hit.rule.action == "pick":
                alts = (view_top(session) or [])
                for tid, _lp in alts:
                    if eos is not None and tid in session.engine.eos_ids:
                        continue
                    piece = session.engine.token_bytes(tid).decode("utf-8", errors="ignore")
                    if alternative_ok(hit.rule, text, piece, hit, starts[i]):
                        chosen = tid
                        break
                if chosen is None:
                    report.messages.append(
                        f"rule {hit.rule.name!r}: no top-k alternative at token {i} avoids {hit.text!r}; stopping there"
                    )
            if chosen is None:
                if eos is None:
                    report.messages.append("the model has no EOS token; cannot stop")
                    report.end = "gave-up"
                    break
                chosen = eos
            node = session.pick(chosen)
        report.steers += 1
        report.by_rule[hit.rule.name] = report.by_rule.get(hit.rule.name, 0) + 1
        pieces.append(node.text)
        protected = len(before) + len(node.text)
        if on_event:
            on_event(f"{hit.rule.annotator} at token {i}: {hit.text!r} -> {node.text!r}")
        if eos is not None and node.tokens and node.tokens[-1] in session.engine.eos_ids:
            report.end = "eos"
            break
    else:
        report.end = report.end or "length"
    report.response_tokens = len(pieces)
    report.text = "".join(pieces)
    return report


def _rewrite(
    session: Any,
    hit: Hit,
    text: str,
    pieces: list[str],
    starts: list[int],
    protected: int,
    token_texts: list[str],
    *,
    attempt: int,
    tries: int,
) -> tuple[int, str | None, str]:
    """The rollback token and the model-written correction for a ``rewrite`` hit (or None
    and why). Written before anything is rolled back, so giving up changes nothing.

    The rewrite starts at the token holding the scope's first character; text of that token
    before the scope (only ever spaces in practice) is left to the model, which writes its
    own spacing. A rewrite the rule still matches is written again with the token that
    started the match banned too, ``tries`` times."""
    import numpy as np

    rule = hit.rule
    start = scope_start(text, hit.start, protected, rule.scope)
    i = token_at(starts, start)
    prefix = text[starts[i] : start]
    engine = session.engine
    context = list(session.context_tokens)[: len(session.context_tokens) - (len(pieces) - i)]
    head: list[int] = []
    if prefix.strip():  # the scope starts inside a token: keep that token's text before it
        head = engine.tokenize(prefix, add_bos=False, special=False)
    banned = banned_tokens(token_texts, hit.text)
    seed = session.sampling.seed if session.sampling.seed is not None else 0
    rng = np.random.default_rng([seed, attempt])
    for _ in range(tries):
        out = write_rewrite(engine, context + head, session.sampling, banned, rule.max_tokens, rng)
        written = engine.detokenize(out).rstrip("\ufffd")
        rewrite = (prefix if head else "") + written
        if not rewrite.strip():
            return i, None, f"the model wrote nothing in place of {hit.text!r} at token {i}"
        again = rule.pattern.search(rewrite)
        if again is None:
            return i, rewrite, ""
        # ban the token that started the match inside the rewrite, and write again
        offset = len(prefix) if head else 0
        for tok in out:
            offset += len(token_texts[tok])
            if offset > again.start():
                banned.add(tok)
                break
    return i, None, f"every rewrite of {hit.text!r} at token {i} still matched after {tries} tries"


def view_top(session: Any) -> list[tuple[int, float]] | None:
    """Top-k alternatives for the token at the current position (the cut token's)."""
    cut = session.cut
    if cut is None:
        return None
    node = session.tree.node(cut)
    return [(int(t), float(lp)) for t, lp in node.top[0]] if node.top else None


# ---------------------------------------------------------------------------------------
# the command


@dataclass
class AutoReport:
    samples: list[SampleReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # tasks that could not start, with why

    @property
    def steers(self) -> int:
        return sum(s.steers for s in self.samples)

    @property
    def model_tokens(self) -> int:
        return sum(s.model_tokens for s in self.samples)

    @property
    def steer_rate(self) -> float:
        """Steers per 1,000 model-generated tokens."""
        return 1000.0 * self.steers / self.model_tokens if self.model_tokens else 0.0

    def summary(self) -> dict[str, Any]:
        by_rule: dict[str, int] = {}
        for s in self.samples:
            for k, v in s.by_rule.items():
                by_rule[k] = by_rule.get(k, 0) + v
        return {
            "samples": len(self.samples),
            "steers": self.steers,
            "model_tokens": self.model_tokens,
            "steers_per_1k_tokens": round(self.steer_rate, 3),
            "by_rule": by_rule,
            "gave_up": sum(1 for s in self.samples if s.end == "gave-up"),
            "skipped_tasks": len(self.skipped),
        }


def run_auto(
    *,
    rules: list[Rule],
    tasks: list[TaskSpec],
    store: Any,
    engine: Any,
    samples: int = 1,
    max_tokens: int = 256,
    sampling: dict[str, Any] | None = None,
    dry_run: bool = False,
    on_event: Callable[[str], None] | None = None,
) -> AutoReport:
    """Steer every task ``samples`` times with ``rules`` on one loaded engine. With
    ``dry_run`` the trees go to a temporary store that is deleted afterwards."""
    from steer_tui.core.session import Session, SessionError
    from steer_tui.core.store import Store

    report = AutoReport()
    tmp = tempfile.TemporaryDirectory(prefix="steer-auto-") if dry_run else None
    target = Store(tmp.name) if tmp else store
    base = dict(sampling or {})
    try:
        for t_i, spec in enumerate(tasks):
            for s_i in range(samples):
                samp = dict(base)
                if samp.get("seed") is not None:
                    samp["seed"] = int(samp["seed"]) + 1000 * t_i + s_i
                title = spec.display_title + (f" (sample {s_i + 1})" if samples > 1 else "")
                kw: dict[str, Any] = {"store": target, "model": engine, "sampling": samp, "title": title, "annotator": "auto"}
                if spec.messages is not None:
                    kw["messages"] = spec.messages
                else:
                    kw["prompt"] = spec.prompt
                try:
                    session = Session.create(**kw)
                except SessionError as exc:  # e.g. a prompt longer than the context
                    report.skipped.append(f"{spec.id or title}: {exc}")
                    break  # every sample of this task would fail the same way
                with session:
                    rep = steer_sample(session, rules, max_tokens=max_tokens, on_event=on_event)
                report.samples.append(rep)
    finally:
        if tmp:
            tmp.cleanup()
    return report


def run_auto_cli(ns: argparse.Namespace) -> int:
    from steer_tui.core.engine import open_engine
    from steer_tui.core.store import Store

    rules = load_rules(ns.rules)
    tasks, errors = load_task_queue(ns.tasks)
    for e in errors:
        print(f"steer-tui: skipped {e}", file=sys.stderr)
    kwargs: dict[str, Any] = {"adapter": ns.adapter, "n_ctx": ns.n_ctx, "extra_bufts": getattr(ns, "extra_bufts", None)}
    engine = open_engine(ns.model, **kwargs)
    sampling: dict[str, Any] = {"seed": ns.seed if ns.seed is not None else 0}
    if ns.temperature is not None:
        sampling["temperature"] = ns.temperature
    store = Store(ns.store) if ns.store else Store()
    try:
        report = run_auto(
            rules=rules,
            tasks=tasks,
            store=store,
            engine=engine,
            samples=ns.samples,
            max_tokens=ns.max_tokens,
            sampling=sampling,
            dry_run=ns.dry_run,
        )
    finally:
        close = getattr(engine, "close", None)
        if close:
            close()
    summary = report.summary()
    for msg in report.skipped:
        print(f"steer-tui: skipped task {msg}", file=sys.stderr)
    for s in report.samples:
        for m in s.messages:
            print(f"steer-tui: {s.task}: {m}", file=sys.stderr)
    if ns.dry_run:
        print(f"steer rate: {summary['steers_per_1k_tokens']} steers per 1,000 tokens "
              f"({summary['steers']} steers over {summary['model_tokens']} generated tokens, {summary['samples']} samples)")
    else:
        print(f"wrote {summary['samples']} tasks with {summary['steers']} steers to {store.tasks_dir}")
    print(json.dumps(summary))
    return 0
