"""Applying steering rules to sessions: steer one sample as its tokens stream
(:func:`steer_sample`) and a whole task queue on one engine (:func:`run_auto`). The result is
an ordinary steer tree per sample (annotator ``auto:<rule name>``). Rules and matching are in
``steer_tui.core.auto``.

Rules are checked while tokens stream, so a steer happens at the first offending token, as a
person watching would have done it.

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

A rule that cannot be satisfied (no acceptable alternative, or the same token position
steered ``max_attempts`` times) ends the sample with a message instead of looping.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from steer_tui.core.auto import Hit, Rule, alternative_ok, banned_tokens, find_hit, scope_start, token_at
from steer_tui.core.engine_base import Engine
from steer_tui.core.errors import EngineError
from steer_tui.core.sampling import Sampling, sample_token
from steer_tui.core.session import Session
from steer_tui.core.session_errors import SessionError
from steer_tui.core.store import Store
from steer_tui.core.tasks import TaskSpec

__all__ = ["AutoReport", "SampleReport", "run_auto", "steer_sample", "write_rewrite"]


def write_rewrite(
    engine: Engine,
    context: list[int],
    sampling: Sampling,
    banned: set[int],
    max_tokens: int,
    rng: np.random.Generator,
) -> list[int]:
    """Let the model write up to ``max_tokens`` tokens after ``context`` with ``banned`` ids
    masked out (their logits set to -inf before sampling); stops before an EOS token."""
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


def _token_texts(engine: Engine) -> list[str]:
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
    session: Session,
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
            i, rewrite, why = _rewrite(session, hit, rules, text, pieces, starts, protected, token_texts,
                                       attempt=report.steers, tries=max_attempts)
            if rewrite is None:
                report.messages.append(f"rule {hit.rule.name!r}: {why}; giving up on this sample")
                report.end = "gave-up"
                break
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
                chosen = end_token(session)
            node = session.pick(chosen)
        report.steers += 1
        report.by_rule[hit.rule.name] = report.by_rule.get(hit.rule.name, 0) + 1
        # one piece per token, as the rollbacks count them: the steer's node may hold many
        # tokens (a rewrite ~20), each decoded in context
        pieces = [t.text for t in session.tokens_view()]
        protected = len("".join(pieces))
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
    session: Session,
    hit: Hit,
    rules: list[Rule],
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
    started the match banned too, ``tries`` times. Any rule counts, not only the one that
    fired: the rewrite is protected from later steers, so a word another rule forbids would
    be trained as the chosen side."""
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
        again = find_hit(rules, rewrite, 0, final=True)
        if again is None:
            return i, rewrite, ""
        # ban the matched word (every tokenisation) and the token that started the match
        # inside the rewrite, and write again
        banned |= banned_tokens(token_texts, again.text)
        offset = len(prefix) if head else 0
        for tok in out:
            offset += len(token_texts[tok])
            if offset > again.start:
                banned.add(tok)
                break
    return i, None, f"every rewrite of {hit.text!r} at token {i} still matched a rule after {tries} tries"


def end_token(session: Session) -> int:
    """The end-of-generation token a ``stop`` steer writes: the one the model's chat template
    closes an assistant turn with (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ...),
    not whichever end token comes first in the vocabulary (SmolLM2's first is the
    document-level ``<|endoftext|>``). Without a template, or with one end token, the first."""
    engine = session.engine
    ids = engine.eos_ids
    if len(ids) > 1:
        mark = "STEER_TURN_END_PROBE"
        try:
            text = engine.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}])
        except EngineError:
            text = ""
        after = text[text.find(mark) + len(mark):] if mark in text else ""
        found = [(after.find(p), t) for t in ids
                 if (p := engine.token_bytes(t).decode("utf-8", errors="ignore")) and p in after]
        if found:
            return int(min(found)[1])
    return int(ids[0])


def view_top(session: Session) -> list[tuple[int, float]] | None:
    """Top-k alternatives for the token at the current position (the cut token's)."""
    cut = session.cut
    if cut is None:
        return None
    node = session.tree.node(cut)
    return [(int(t), float(lp)) for t, lp in node.top[0]] if node.top else None


# ---------------------------------------------------------------------------------------
# a task queue


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
    store: Store,
    engine: Engine,
    samples: int = 1,
    max_tokens: int = 256,
    sampling: dict[str, Any] | None = None,
    dry_run: bool = False,
    on_event: Callable[[str], None] | None = None,
) -> AutoReport:
    """Steer every task ``samples`` times with ``rules`` on one loaded engine. With
    ``dry_run`` the trees go to a temporary store that is deleted afterwards."""
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
