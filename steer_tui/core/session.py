"""The headless steering session: a task's tree, an engine and a position in the tree.

The TUI, ``steer-tui auto`` and scripts all drive a ``Session``; see docs/session.md.
Setting one up (engine, prompt, model check) is in ``session_setup``; the per-token text
views are in ``token_view``; the errors in ``session_errors``.

Position model
--------------
The session's current path runs from the prompt through a chain of nodes to ``end`` (a
node id, or ``None`` = nothing after the prompt). Rollbacks split nodes, so the position is
always the end of a whole node. ``cut`` is the child of ``end`` that the last rollback cut
away (still in the tree): the next ``correct``/``pick`` replaces it (a steer), the next
``generate`` becomes its sibling (a resample).

Saving
------
Every mutation a user would mind losing (generation end, steer, rollback, accept, undo,
redo) saves atomically through the store. A failed save raises ``SaveError`` *after* the
in-memory change is made; the state is kept, ``dirty`` stays True and the next save retries.
The position is stored in the file under the extra key ``"session"`` so that
``Session.open`` continues exactly where the last session stopped.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from steer_tui.core import steering
from steer_tui.core.engine_base import Engine, Step
from steer_tui.core.errors import EngineError
from steer_tui.core.sampling import Sampling, fresh_seed
from steer_tui.core.session_errors import (
    ModelMismatchWarning,
    SaveError,
    SessionBusy,
    SessionError,
)
from steer_tui.core.session_setup import close_engine, new_task, open_task
from steer_tui.core.store import Store, StoreError, TaskLock
from steer_tui.core.token_view import Token, TokenInfo, decoder_at, tokens_view
from steer_tui.core.tree import Node, SteerTree

__all__ = ["TOP_K", "Session"]

#: How many alternatives are recorded per token (SPEC: k >= 5).
TOP_K = 5


class Session:
    """Steer one task. Build with ``Session.create`` or ``Session.open``; use as a context
    manager (or call ``close()``) to release the task lock."""

    def __init__(
        self,
        *,
        store: Store,
        tree: SteerTree,
        engine: Engine,
        owns_engine: bool = False,
        lock: TaskLock | None = None,
        annotator: str | None = None,
        read_only: bool = False,
    ) -> None:
        self.store = store
        self.tree = tree
        self.engine = engine
        self.annotator = annotator
        self.read_only = read_only
        self.sampling = Sampling.from_dict(tree.sampling)
        self.last_end: str | None = None
        #: True while the tree has changes that are not on disk (e.g. after a failed save).
        self.dirty = False
        #: Seconds between checkpoint saves during a long generation (it is saved at its end anyway).
        self.autosave_interval = 10.0
        self.warnings: list[str] = []
        self._owns_engine = owns_engine
        self._lock_handle = lock
        self._mu = threading.RLock()
        self._generating = False
        self._end: str | None = None
        self._cut: str | None = None
        self._new_branch = False
        self._redo: list[tuple[str, str | None]] = []  # (undone node id, position before undo)
        self._closed = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        store: Store | str | os.PathLike[str] | None = None,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        system: str | None = None,
        raw: bool = False,
        model: Any = None,
        adapter: str | os.PathLike[str] | None = None,
        sampling: dict | Sampling | None = None,
        title: str | None = None,
        task_id: str | None = None,
        annotator: str | None = None,
        n_ctx: int | None = None,
    ) -> Session:
        """Start a new task: render the prompt (chat template unless ``raw``), tokenize it,
        write the file and take the task lock.

        ``prompt`` is a user message (or, with ``raw=True``, the exact text the model sees,
        control tokens such as ``<|im_start|>`` included); ``messages`` is a full chat;
        ``system`` adds a system message. ``sampling.seed=None`` draws a seed, which is
        recorded so the task can be reproduced. ``model`` is None (bundled default), a
        GGUF path or an Engine object (not closed by the session)."""
        p = new_task(
            store, prompt=prompt, messages=messages, system=system, raw=raw, model=model, adapter=adapter,
            sampling=sampling, title=title, task_id=task_id, n_ctx=n_ctx,
        )
        s = cls(store=p.store, tree=p.tree, engine=p.engine, owns_engine=p.owns_engine, lock=p.lock, annotator=annotator)
        try:
            s.save()
        except SaveError:
            s.close()
            raise
        return s

    @classmethod
    def open(
        cls,
        store: Store | str | os.PathLike[str] | None = None,
        task_id: str | None = None,
        model: Any = None,
        read_only: bool = False,
        annotator: str | None = None,
        adapter: str | os.PathLike[str] | None = None,
        n_ctx: int | None = None,
    ) -> Session:
        """Continue a saved task where it stopped. The model's vocabulary must match the
        tree's (else ``ModelMismatch``); a different model file with the same vocabulary only
        warns (``ModelMismatchWarning``, also listed in ``session.warnings``). Raises
        ``TaskLocked`` if another session holds the task, unless ``read_only``."""
        p = open_task(store, task_id, model=model, read_only=read_only, adapter=adapter, n_ctx=n_ctx)
        s = cls(
            store=p.store, tree=p.tree, engine=p.engine, owns_engine=p.owns_engine, lock=p.lock,
            annotator=annotator, read_only=read_only,
        )
        warn = p.warning
        if warn:
            s.warnings.append(warn)
            warnings.warn(warn, ModelMismatchWarning, stacklevel=2)
        s._end, s._cut = steering.restored_position(s.tree)
        return s

    def close(self) -> None:
        """Release the task lock (and the engine if the session loaded it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._lock_handle is not None:
            self._lock_handle.release()
            self._lock_handle = None
        if self._owns_engine:
            close_engine(self.engine)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ position

    @property
    def task_id(self) -> str:
        """The id of the task (its file is ``<store>/tasks/<task_id>.json``)."""
        return self.tree.id

    @property
    def end(self) -> str | None:
        """Id of the last node of the current path (None: nothing after the prompt)."""
        return self._end

    @property
    def cut(self) -> str | None:
        """The child of ``end`` that the last rollback cut away (the next steer's rejected side)."""
        return self._cut

    @property
    def generating(self) -> bool:
        """True while a ``generate`` iterator is running (the tree may not be changed then)."""
        return self._generating

    @property
    def path(self) -> list[Node]:
        """The nodes of the current path, root first."""
        return self.tree.path(self._end)

    @property
    def prompt_tokens(self) -> list[int]:
        """The prompt's token ids, as stored in the tree."""
        return self.tree.prompt_tokens

    @property
    def response_tokens(self) -> list[int]:
        """Token ids of the current path after the prompt."""
        with self._mu:
            return self.tree.path_tokens(self._end)

    @property
    def context_tokens(self) -> list[int]:
        """What the model sees: prompt tokens then response tokens."""
        return self.prompt_tokens + self.response_tokens

    @property
    def response_text(self) -> str:
        """The detokenized response: concatenation of the pieces of ``tokens_view()``."""
        return "".join(n.text for n in self.path)

    def tokens_view(self) -> list[TokenInfo]:
        """One entry per response token of the current path (UTF-8-safe text pieces)."""
        with self._mu:
            return tokens_view(self.tree, self._end, self.engine.token_bytes)

    def siblings(self, node_id: str | None = None) -> list[Node]:
        """The node (default: the current end, or the cut node after a rollback) and its
        siblings, in creation order: the alternatives the UI's [ and ] cycle through."""
        with self._mu:
            nid = node_id or self._cut or self._end
            if nid is None:
                return []
            return self.tree.children(self.tree.node(nid).parent)

    def switch_branch(self, node_id: str) -> None:
        """Move to another branch: the current path becomes the one through ``node_id`` down
        to its most recently created non-discarded leaf."""
        with self._mu:
            self._check_idle()
            self.tree.node(node_id)
            self._move(self.tree.latest_leaf(node_id))

    def goto(self, node_id: str | None) -> None:
        """Make ``node_id`` the end of the current path (None: back to the bare prompt)."""
        with self._mu:
            self._check_idle()
            if node_id is not None:
                self.tree.node(node_id)
            self._move(node_id)

    # ------------------------------------------------------------------ generation

    def generate(self, max_tokens: int | None = None, stop: threading.Event | None = None) -> Iterator[Token]:
        """Let the model continue the current path; yields ``Token``s as they arrive.

        The tokens go to a model node: a new child of ``end``, or, when ``end`` is a model
        node that was paused or hit ``max_tokens`` and has nothing after it, that same node
        is extended (so pause/continue does not fragment the tree). After a rollback or
        ``resample()`` it is always a new node (a sibling of what was cut). When it stops,
        ``last_end`` and the node's ``end`` say why (eos | length | context | paused) and the
        tree is saved. Setting ``stop`` pauses it after the current token. A path that
        already ends with an EOS token yields nothing (``last_end == "eos"``)."""
        with self._editing():  # refuse now, not at the first next()
            pass
        return self._run_generation(max_tokens, stop)

    def _run_generation(self, max_tokens: int | None, stop: threading.Event | None) -> Iterator[Token]:
        with self._editing():
            self._generating = True
        try:
            yield from self._generate(max_tokens, stop)
        finally:
            with self._mu:
                self._generating = False

    def _generate(self, max_tokens: int | None, stop: threading.Event | None) -> Iterator[Token]:
        with self._mu:
            context = self.context_tokens
            if len(context) > len(self.prompt_tokens) and context[-1] in self.engine.eos_ids:
                # the path already ended with EOS: nothing to continue (roll back first)
                self.last_end = "eos"
                return
            parent = self._end
            node = self.tree.node(parent) if parent is not None else None
            adapter = self.engine.adapter
            extend = self._cut is None and not self._new_branch and steering.can_extend(self.tree, node, adapter)
            seed = self.sampling.seed if self.sampling.seed is not None else fresh_seed()
            rng = steering.generation_rng(seed, context, self.tree, parent)
            dec = decoder_at(self.tree, parent, self.engine.token_bytes)
            gen = self.engine.generate(
                context, self.sampling, max_tokens=max_tokens, stop=stop, top_k=TOP_K, rng=rng
            )
            target = node if extend else None  # a new node is created on the first token
            index = len(context) - len(self.prompt_tokens)
        step: Step
        last_save = time.monotonic()
        try:
            for step in gen:
                piece = dec.feed(self.engine.token_bytes(step.id))
                with self._mu:
                    if target is None:
                        target = steering.new_model_node(self.tree, parent, adapter)
                        self._move(target.id)
                        self._redo.clear()
                    elif target.id != self._end:
                        self._end = target.id
                    steering.append_step(target, step, piece)
                    self.dirty = True
                    if time.monotonic() - last_save >= self.autosave_interval:
                        # a long generation is checkpointed, so a crash loses seconds, not minutes
                        last_save = time.monotonic()
                        try:
                            self._save_quietly_or_raise()
                        except SaveError:
                            pass  # still dirty; the save at the end reports it
                top = [(t, steering.stored_logprob(lp)) for t, lp in step.top]
                yield Token(int(step.id), piece, steering.stored_logprob(step.logprob), top, index)
                index += 1
        finally:
            end = gen.end or "paused"  # the consumer stopped iterating early: a pause
            with self._mu:
                self.last_end = end
                if target is not None:
                    target.end = end
                    self.tree.touch()
                    self.dirty = True
                    self._save_quietly_or_raise()

    def resample(self) -> None:
        """The next ``generate`` starts a new model branch at the current position (a sibling
        of what was cut, or a new child of ``end`` instead of extending it)."""
        with self._editing():
            self._new_branch = True

    # ------------------------------------------------------------------ steering

    def rollback(self, n: int) -> None:
        """Keep the first ``n`` response tokens of the current path. A node that ``n`` falls
        inside is split (``tree.split``); what is cut stays in the tree as ``cut``, the
        rejected side of the next steer. Nothing is evaluated (the engine drops the cut part
        of its KV cache lazily, on the next evaluation). If ``n`` falls between the byte
        tokens of one character (an emoji split by a byte-level tokenizer), the rollback
        keeps only the tokens before that character, so no half character is left behind."""
        with self._editing():
            if isinstance(n, bool) or not isinstance(n, int):
                raise SessionError(f"rollback takes a token count, got {n!r}")
            point = steering.rollback_point(self.tree, self.tree.path(self._end), n, self.engine.token_bytes)
            if point is None:
                return
            self._move(*point)
            self._redo.clear()
            self._changed()

    def correct(self, text: str) -> Node:
        """Add the human's text at the current position (a ``correction`` replacing what the
        last rollback cut, or an ``append`` when nothing was cut).

        The text is tokenized on its own (no BOS, control-token text stays plain text) and
        those ids are appended to the path: the tree's ids are exactly what the engine then
        evaluates (``engine.score``), which gives each correction token's log-prob and top-k.
        A tokenizer might have merged the text differently with the preceding response; we
        keep the typed boundary, which is what the human meant and what training sees."""
        if not isinstance(text, str):
            raise SessionError(f"a correction must be text, got {type(text).__name__}")
        if not text.strip():
            raise SessionError("a correction cannot be empty or only whitespace")
        with self._editing():
            tokens = self.engine.tokenize(text, add_bos=False, special=False)
            if not tokens:
                raise SessionError(f"the correction {text!r} produced no tokens")
            return self._add_human(tokens, "correction")

    def pick(self, token_id: int) -> Node:
        """Choose the next token yourself (normally one of the top-k alternatives shown at
        the current end; any id of the vocabulary is accepted). A ``pick`` node that replaces
        what the last rollback cut, if anything."""
        with self._editing():
            if isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)):
                raise SessionError(f"pick takes a token id, got {token_id!r}")
            if not 0 <= int(token_id) < self.engine.n_vocab:
                raise SessionError(f"token id {token_id} is not in the vocabulary (0..{self.engine.n_vocab - 1})")
            return self._add_human([int(token_id)], "pick")

    def _add_human(self, tokens: list[int], kind: str) -> Node:
        context = self.context_tokens
        if len(context) + len(tokens) > self.engine.n_ctx:
            raise SessionError(
                f"the response would be {len(context) + len(tokens)} tokens, over the context "
                f"window ({self.engine.n_ctx}); roll back first"
            )
        try:
            steps = self.engine.score(context, tokens, top_k=TOP_K)
        except EngineError as exc:
            raise SessionError(str(exc)) from None
        dec = decoder_at(self.tree, self._end, self.engine.token_bytes)
        text = "".join(dec.feed(self.engine.token_bytes(t)) for t in tokens)
        node = steering.add_human(
            self.tree, parent=self._end, cut=self._cut, kind=kind, tokens=tokens, text=text, steps=steps,
            annotator=self.annotator,
        )
        self._move(node.id)
        self._redo.clear()
        self._changed()
        return node

    def accept(self) -> None:
        """Mark the current path as good as a whole (its end goes to ``accepted``)."""
        with self._editing():
            if self._end is None:
                raise SessionError("nothing to accept: the response is empty")
            if self._end not in self.tree.accepted:
                self.tree.accepted.append(self._end)
                self.tree.touch()
            self._changed()

    def undo(self) -> Node | None:
        """Undo the most recent human node on the current path: it is added to ``discarded``
        (never deleted) and the position returns to the model branch it replaced (that
        branch's original end), or to its parent for an append/pick without ``replaces``.
        Returns the undone node, or None when there is nothing to undo."""
        with self._editing():
            done = steering.undo_node(self.tree, self._end)
            if done is None:
                return None
            human, end = done
            self._redo.append((human.id, self._end))
            self._move(end)
            self._changed()
            return human

    def redo(self) -> Node | None:
        """Restore the last undone node (and the position it had). None if nothing to redo."""
        with self._editing():
            if not self._redo:
                return None
            nid, pos = self._redo.pop()
            steering.redo_node(self.tree, nid)
            self._move(pos if (pos is None or pos in self.tree) else nid)
            self._changed()
            return self.tree.node(nid)

    # ------------------------------------------------------------------ saving

    def save(self) -> Path:
        """Write the tree atomically (with the current position). Raises ``SaveError`` on
        failure; the in-memory state is kept and ``dirty`` stays True."""
        with self._mu:
            self._check_writable()
            steering.store_position(self.tree, self._end, self._cut)
            try:
                path = self.store.save(self.tree)
            except StoreError as exc:
                self.dirty = True
                raise SaveError(str(exc)) from exc
            self.dirty = False
            return path

    def _save_quietly_or_raise(self) -> None:
        if not self.read_only:
            self.save()

    # ------------------------------------------------------------------ helpers

    @contextmanager
    def _editing(self) -> Iterator[None]:
        """Hold the session lock for a change of the tree: refused when read-only, closed
        or while generating."""
        with self._mu:
            self._check_writable()
            self._check_idle()
            yield

    def _move(self, end: str | None, cut: str | None = None) -> None:
        """Set the position; the next generation extends ``end`` again unless resampled."""
        self._end, self._cut = end, cut
        self._new_branch = False

    def _changed(self) -> None:
        """The tree changed in a way the user would mind losing: mark it and save it."""
        self.dirty = True
        self._save_quietly_or_raise()

    def _check_idle(self) -> None:
        if self._generating:
            raise SessionBusy("the model is generating; pause it first")

    def _check_writable(self) -> None:
        if self.read_only:
            raise SessionError(f"task {self.tree.id!r} is open read-only")
        if self._closed:
            raise SessionError("the session is closed")


