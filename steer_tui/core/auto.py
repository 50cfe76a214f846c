"""Headless rule-driven steering: ``steer-tui auto --rules RULES.toml --tasks FILE.jsonl``.

Rules are checked while tokens stream, so a steer happens at the first offending token, as a
person watching would have done it, and the result is an ordinary steer tree (annotator
``auto:<rule name>``).

A rule (TOML, one ``[[rule]]`` table each)::

    [[rule]]
    name = "plain-words"
    pattern = '\\bvibrant\\b'     # Python regex over the response text
    action = "replace"            # replace | pick | stop
    replace = "lively"            # replace: the correction text
    ignore_case = false           # optional

Actions, at the token where the match starts:
- ``replace``: roll back to that token and type the text of that token before the match
  plus ``replace`` (a ``correction`` steer); generation continues after it.
- ``pick``: roll back to that token and pick the model's best top-k alternative that does
  not start the match again (a ``pick`` steer).
- ``stop``: roll back to that token and pick end-of-sequence there (a ``pick`` steer whose
  chosen token is EOS); the sample ends.

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

ACTIONS = ("replace", "pick", "stop")
_RULE_KEYS = {"name", "pattern", "action", "replace", "ignore_case", "description"}


class RuleError(ValueError):
    """A rules file is unusable; the message names the file, the rule and the problem."""


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern[str]
    action: str
    replace: str | None = None

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
        rules.append(Rule(name=name, pattern=compiled, action=action, replace=replace))
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
        before = "".join(pieces[:i])
        token_prefix = text[starts[i] : hit.start]
        session.rollback(i)
        pieces = pieces[:i]
        session.annotator = hit.rule.annotator
        if hit.rule.action == "replace":
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
