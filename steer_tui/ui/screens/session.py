"""The steering screen: owns one headless ``Session`` and is a view over it.

Nothing here blocks the UI thread on the model or the disk. Generation runs in a thread
worker (``_stream``) that calls ``session.generate`` with a ``threading.Event`` for pause
and posts batched ``Streamed`` messages (at most one every 50 ms). A steer (rollback +
correction, pick or resample: the engine evaluates tokens) runs in the ``_steer`` worker,
then generation resumes. Saves, the quick changes that save themselves (undo, redo,
accept, branch and tree jumps) and the top-k lookup after the end run one at a time, in
order, as *jobs* in the job worker; a steering key pressed while a job runs waits for it,
so keys keep their order. The screen mutates the session only
while nothing else does: a steering key pressed while streaming first pauses.

A failed save keeps the work in memory, says so, and is retried every
``save_retry_seconds`` until it succeeds (one pending retry at a time).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual.worker import Worker, WorkerState

from steer_tui.core.engine import EngineError
from steer_tui.core.session import SaveError, SessionErrors, TokenInfo
from steer_tui.core.stats import count_steers
from steer_tui.ui.keys import SESSION_KEYS, bindings
from steer_tui.ui.path_model import PathView, Piece, last_end, path_view, sibling_branch, steer_point
from steer_tui.ui.render import one_line
from steer_tui.ui.screens.alternatives import AlternativesScreen, alternatives
from steer_tui.ui.screens.jobs import WORKER_ENDS, Job, JobQueue
from steer_tui.ui.screens.saving import SAVE_RETRY_SECONDS, SaveKeeper
from steer_tui.ui.screens.stats import StatsScreen
from steer_tui.ui.screens.tree import TreeScreen
from steer_tui.ui.session_factory import OPEN_ERRORS
from steer_tui.ui.widgets.correction import CorrectionBar
from steer_tui.ui.widgets.status import CursorInfo, StatusBar, cursor_text, model_label, prompt_line
from steer_tui.ui.widgets.token_view import TokenView

# Coalesce streamed tokens: at most 20 screen updates a second. Smooth to read, and each
# frame costs the UI thread CPU that a small machine would rather give the model: on 2
# cores, app/Session.generate measured ~0.84 with 30 ms batches and ~0.9 with 50 ms.
BATCH_SECONDS = 0.05
END_STATES = {"eos": "ended (eos)", "length": "paused (max tokens)", "context": "context full"}


@dataclass
class StreamedToken:
    text: str
    logprob: float | None


class SessionScreen(Screen[None]):
    """One task: the token view, the correction editor, the cursor info and status bars."""

    BINDINGS = bindings(SESSION_KEYS)

    save_retry_seconds: float = SAVE_RETRY_SECONDS
    """Delay before a failed save is retried (one pending retry at a time)."""

    @dataclass
    class Streamed(Message):
        """A batch of tokens from generation ``gen``'s worker."""

        gen: int
        tokens: list[StreamedToken]

    @dataclass
    class StreamEnded(Message):
        """Generation ``gen``'s worker stopped: ``end`` is eos|length|context|paused, or error."""

        gen: int
        end: str | None
        error: BaseException | None = None

    @dataclass
    class Loaded(Message):
        """The loader worker opened the session, or failed with ``error``."""

        session: Any | None
        error: BaseException | None

    @dataclass
    class SteerDone(Message):
        """A steer (rollback + correct/pick/resample at ``at``) finished in its worker."""

        error: BaseException | None
        title: str
        at: int

    @dataclass
    class JobDone(Message):
        """A job finished in the job worker."""

        job: Job

    def __init__(self, loader: Callable[[], Any], *, task_label: str = "", autostart: bool = True) -> None:
        super().__init__()
        self._loader = loader
        self.session: Any | None = None
        self.task_label = task_label
        self.autostart = autostart
        self._stop = threading.Event()
        self._gen = 0
        self._worker: Worker | None = None
        self._steer_worker: Worker | None = None
        self.jobs = JobQueue(self._job_in_thread)
        self.saves = SaveKeeper(self)
        self._path: PathView | None = None
        self.closed = False

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        yield Static("", id="prompt-line")
        yield TokenView(id="tokens")
        yield CorrectionBar(id="correction-bar")
        yield CursorInfo(id="cursor-info")
        yield StatusBar(id="status")
        yield Footer()

    @property
    def view(self) -> TokenView:
        return self.query_one(TokenView)

    @property
    def status(self) -> StatusBar:
        return self.query_one(StatusBar)

    @property
    def editor(self) -> CorrectionBar:
        return self.query_one(CorrectionBar)

    def on_mount(self) -> None:
        self.view.prob_colors = getattr(self.app, "config", None) is not None and self.app.config.prob_colors
        self.status.state = "loading"
        self.status.task = self.task_label
        self.view.focus()
        self._load()

    @work(thread=True, exclusive=True, group="load")
    def _load(self) -> None:
        try:
            session = self._loader()
        except OPEN_ERRORS as exc:  # shown as a notification, the app stays usable
            self.post_message(self.Loaded(None, exc))
            return
        self.post_message(self.Loaded(session, None))

    def on_session_screen_loaded(self, event: Loaded) -> None:
        if event.error is not None:
            self.status.state = "error"
            self.query_one("#prompt-line", Static).update(Text(one_line(str(event.error)), style="bold red"))
            self.app.notify(str(event.error), title="Could not open the task", severity="error", timeout=10)
            return
        self.session = event.session
        if self.closed:  # the user left before it loaded
            self._close_session()
            return
        for warning in getattr(self.session, "warnings", []) or []:
            self.app.notify(str(warning), title="Model", severity="warning", timeout=10)
        self._refresh_all()
        self._show_model()
        self.status.ctx_limit = int(getattr(self.session.engine, "n_ctx", 0) or 0)
        self.status.save_state = "read-only" if self._read_only else "saved"
        # a new task starts streaming at once; a reopened one waits where it stopped (it
        # was paused for a reason): space continues
        fresh = self.session.end is None and not self.session.tree.nodes
        if self.autostart and fresh and not self._read_only:
            self.start_generation()
        else:
            self._set_paused_state()

    # ------------------------------------------------------------------ state
    @property
    def streaming(self) -> bool:
        """The generation worker is running."""
        return self._worker is not None and self._worker.state in (WorkerState.PENDING, WorkerState.RUNNING)

    @property
    def steering(self) -> bool:
        """A steer is being evaluated in its worker (generation follows it)."""
        w = self._steer_worker
        return w is not None and w.state in (WorkerState.PENDING, WorkerState.RUNNING)

    @property
    def generating(self) -> bool:
        """The model is busy: streaming, or evaluating a steer (generation follows it)."""
        return self.streaming or self.steering

    @property
    def busy(self) -> bool:
        """A job runs or waits in the job worker, or its result is not shown yet."""
        return bool(self.jobs)

    @property
    def _read_only(self) -> bool:
        return bool(getattr(self.session, "read_only", False))

    def _last_end(self) -> str | None:
        return last_end(self.session)

    def _refresh_all(self, cursor: int | None = None) -> None:
        s = self.session
        self._path = path_view(s)
        self.view.set_pieces(self._path.pieces, cursor=cursor)
        self.query_one("#prompt-line", Static).update(prompt_line(s.tree))
        self.status.ctx_used = len(s.tree.prompt_tokens) + self.view.n_tokens
        self.status.steers = count_steers(s.tree)
        self._update_cursor_info()

    def _set_paused_state(self) -> None:
        self.status.state = END_STATES.get(self._last_end() or "", "paused")
        self.view.show_cursor = True
        self._update_cursor_info()

    def _update_cursor_info(self) -> None:
        info = self.query_one(CursorInfo)
        if self.session is None:
            info.info = ""
            return
        busy = "streaming… space pauses" if self.streaming else "applying the steer…" if self.steering else ""
        i, n = self.view.cursor, self.view.n_tokens
        tok = self._token_info(i) if not busy and i < n else None
        info.info = cursor_text(tok, busy=busy, n_tokens=n, after_eos=self._last_end() == "eos")

    def _token_info(self, index: int) -> TokenInfo:
        """The response token ``index`` of the current path, from the tree (no copies)."""
        if self._path is None or self.view.n_tokens != self._path.n_tokens:
            self._path = path_view(self.session)
        return self._path.token_info(index, self.view.token_text(index))

    def _invalidate(self) -> None:
        self._path = None

    def on_token_view_cursor_moved(self, event: TokenView.CursorMoved) -> None:
        if not self.generating:
            self._update_cursor_info()

    # ------------------------------------------------------------------ jobs and saving
    @work(thread=True, group="job")
    def _job_in_thread(self, job: Job) -> None:
        try:
            job.result = job.fn()
        except SessionErrors as exc:  # SaveError among them: the change is kept in memory
            job.error = exc
        self.post_message(self.JobDone(job))

    def on_session_screen_job_done(self, event: JobDone) -> None:
        self.jobs.finish(event.job)

    def _after_change(self, cursor: int | None = None) -> None:
        self._invalidate()
        self.saves.save_if_dirty()
        self._refresh_all(cursor)

    def _change(self, fn: Callable[[], Any], title: str, then: Callable[[Any], None]) -> None:
        """Run a quick session change that saves itself (undo, redo, accept) as a job; then
        ``then(result)``. A failed save keeps the change in memory: it is drawn and the save
        retried later. Other errors change nothing."""

        def done(result: Any, error: BaseException | None) -> None:
            if error is None:
                then(result)
                return
            self.saves.report(error, title)
            if isinstance(error, SaveError):
                self._invalidate()
                self._refresh_all(self.view.cursor)
                self._set_paused_state()

        self.jobs.add(fn, done)

    # ------------------------------------------------------------------ generation
    def start_generation(self) -> None:
        if self.session is None or self.generating:
            return  # (a running steer starts generation itself when it is done)
        if self._read_only:
            self.app.notify("This task is open read-only.", severity="warning")
            return
        self._gen += 1
        self._stop = threading.Event()
        self.status.stream_started()
        self.view.show_cursor = False
        self.view.cursor = self.view.n_tokens
        self.status.state = "streaming"
        self._invalidate()
        self._update_cursor_info()
        self._worker = self._stream(self._gen, self._stop)

    @work(thread=True, exclusive=True, group="generate")
    def _stream(self, gen: int, stop: threading.Event) -> None:
        session = self.session
        batch: list[StreamedToken] = []
        last = time.perf_counter()
        post = self.post_message
        try:
            for tok in session.generate(stop=stop):
                batch.append(StreamedToken(tok.text, tok.logprob))
                now = time.perf_counter()
                if now - last >= BATCH_SECONDS:
                    post(self.Streamed(gen, batch))
                    batch = []
                    last = now
            if batch:
                post(self.Streamed(gen, batch))
            post(self.StreamEnded(gen, getattr(session, "last_end", None)))
        except SessionErrors as exc:
            if batch:
                post(self.Streamed(gen, batch))
            post(self.StreamEnded(gen, getattr(session, "last_end", None), exc))

    def on_session_screen_streamed(self, event: Streamed) -> None:
        if event.gen != self._gen:
            return  # a batch from a stream that pause() already settled: the view has it
        view = self.view
        at_end = view.scroll_offset.y >= view.max_scroll_y - 1
        view.append([Piece(t.text, "model", t.logprob) for t in event.tokens])
        view.set_reactive(TokenView.cursor, view.n_tokens)
        if at_end:
            view.scroll_to_end()
        self.status.streamed(len(event.tokens), len(self.session.tree.prompt_tokens) + view.n_tokens)

    def on_session_screen_stream_ended(self, event: StreamEnded) -> None:
        if event.gen != self._gen:
            if event.error is not None:
                self.saves.report(event.error, "Generation stopped")
            return
        self._worker = None
        self.status.streamed(0, len(self.session.tree.prompt_tokens) + self.view.n_tokens, final=True)
        self._invalidate()
        if event.error is not None:
            self.saves.report(event.error, "Generation stopped")
        # the session is the truth: redraw from it (also repairs anything a batch missed)
        self._refresh_all(self.view.n_tokens)
        if event.error is None:
            self.saves.save_if_dirty()
        self._set_paused_state()
        if self._last_end() == "context":
            self.app.notify("The context window is full: roll back, or accept the path.", title="Context full", severity="warning")

    async def pause(self) -> None:
        """Stop streaming and wait until the worker has ended (the session is idle after)."""
        worker = self._worker
        if worker is None:
            return
        self._stop.set()
        try:
            await worker.wait()
        except WORKER_ENDS:
            pass
        # its last Streamed/StreamEnded messages may still be queued: settle now from the
        # session (the truth) and make those messages stale
        if self._worker is worker:
            self._worker = None
            self._gen += 1
            self._invalidate()
            self._refresh_all(self.view.n_tokens)
            self._set_paused_state()

    async def _idle(self) -> bool:
        """Pause if streaming and wait for a running job; False if there is no session to
        act on, a steer is being applied (generation resumes right after) or the editor is open."""
        if self.session is None:
            return False
        if self.streaming:
            await self.pause()
        if self.steering:
            return False
        await self.jobs.settle()
        return self.session is not None and self.editor.at is None

    # ------------------------------------------------------------------ steering (off the UI thread)
    def _steer(self, fn: Callable[[], None], title: str, at: int) -> None:
        """Run a session mutation that evaluates tokens (a correction is scored by the
        engine) in a thread worker, then resume generation. The UI stays responsive."""
        self.status.state = "steering"
        self._steer_worker = self._steer_in_thread(fn, title, at)

    @work(thread=True, exclusive=True, group="steer")
    def _steer_in_thread(self, fn: Callable[[], None], title: str, at: int) -> None:
        try:
            fn()
        except SessionErrors as exc:
            self.post_message(self.SteerDone(exc, title, at))
            return
        self.post_message(self.SteerDone(None, title, at))

    def on_session_screen_steer_done(self, event: SteerDone) -> None:
        self._steer_worker = None
        if self.session is None:
            return
        if event.error is not None:
            self._invalidate()
            self._refresh_all(event.at)
            self.saves.report(event.error, event.title)
            if not isinstance(event.error, SaveError):
                self.saves.save_if_dirty()  # a rollback before the error may have changed the tree
            self._set_paused_state()
            return
        self._after_change()
        if not self.closed:
            self.start_generation()

    def _steer_point(self, at: int) -> int:
        return steer_point(at, self.view.n_tokens, self._last_end())

    def _steer_at(self, at: int, act: Callable[[], Any], title: str) -> None:
        """Roll back to ``at`` (when it is inside the response), then ``act``, as a steer."""
        s, cut = self.session, at < self.view.n_tokens

        def steer() -> None:
            if cut:
                s.rollback(at)
            act()

        self._steer(steer, title, at)

    # ------------------------------------------------------------------ actions
    async def action_toggle_pause(self) -> None:
        if self.session is None or self.steering:
            return
        if self.streaming:
            await self.pause()
            return
        await self.jobs.settle()
        if self._last_end() == "eos":
            self.app.notify("The model ended this response (eos). r resamples, enter corrects, d accepts.", title="Ended")
            return
        if self._last_end() == "context":
            self.app.notify("The context window is full.", severity="warning")
            return
        self.start_generation()

    async def action_correct(self, index: int | None = None) -> None:
        if not await self._idle():
            return
        if self._read_only:
            self.app.notify("This task is open read-only.", severity="warning")
            return
        at = self._steer_point(self.view.cursor if index is None else index)
        self.view.set_pending(at, "")
        self.view.cursor = at
        self.editor.open(at, "append" if at >= self.view.n_tokens else f"replace from #{at}")
        self.status.state = "editing"

    async def on_token_view_correct_requested(self, event: TokenView.CorrectRequested) -> None:
        await self.action_correct(event.index)

    def on_correction_bar_changed(self, event: CorrectionBar.Changed) -> None:
        self.view.set_pending(event.at, event.text)

    def on_correction_bar_cancelled(self) -> None:
        self._close_editor()
        self._set_paused_state()

    def _close_editor(self) -> None:
        self.editor.close()
        self.view.set_pending(None)
        self.view.focus()

    def on_correction_bar_submitted(self, event: CorrectionBar.Submitted) -> None:
        if not event.text.strip():
            self.app.notify("A correction needs some text (escape cancels).", severity="warning")
            return
        self._close_editor()
        s = self.session
        self._steer_at(event.at, lambda: s.correct(event.text), "Correction failed")  # exactly what was typed

    async def action_alternatives(self) -> None:
        if not await self._idle():
            return
        at = self._steer_point(self.view.cursor)
        if at < self.view.n_tokens:
            info = self._token_info(at)
            self._show_alternatives(at, info.id, info.top or [], None)
            return
        s, k = self.session, self._top_k
        # after the end nothing is recorded: the engine evaluates, so it is a job
        self.jobs.add(
            lambda: s.engine.top(list(s.tree.prompt_tokens) + list(s.response_tokens), k),
            lambda top, error: self._show_alternatives(at, None, top or [], error),
        )

    @property
    def _top_k(self) -> int:
        return getattr(getattr(self.app, "config", None), "top_k", 10)

    def _show_alternatives(self, at: int, current: int | None, top: list, error: BaseException | None) -> None:
        if self.session is None:
            return
        if error is not None:
            self.saves.report(error, "No alternatives")
            return
        if not top:
            self.app.notify("No alternatives were recorded for this token.", severity="warning")
            return
        alts = alternatives(top, current=current, engine=self.session.engine, k=self._top_k)
        screen = AlternativesScreen(alts, f"at #{at}" if at < self.view.n_tokens else "after the end")
        self.app.push_screen(screen, lambda choice: self._apply_pick(at, current, choice))

    def _apply_pick(self, at: int, current: int | None, choice: int | None) -> None:
        s = self.session
        if choice is None or s is None or self.generating:
            return
        if choice == current:
            self.app.notify("That is the token already there.")
            return
        self._steer_at(at, lambda: s.pick(choice), "Pick failed")

    async def action_resample(self) -> None:
        if not await self._idle():
            return
        s = self.session
        self._steer_at(self._steer_point(self.view.cursor), s.resample, "Resample failed")

    async def action_branch(self, step: int) -> None:
        if not await self._idle():
            return
        n = self.view.n_tokens
        if n == 0:
            return
        tree = self.session.tree
        branch = sibling_branch(tree, self._token_info(min(self.view.cursor, n - 1)).node_id, step)
        if branch is None:
            self.app.notify("No other branch above the cursor.")
            return
        s, target = self.session, branch.target

        def moved(at: int) -> None:
            self.app.notify(f"branch {branch.number}/{branch.count} at #{at}", timeout=2)

        self._move_to(lambda: s.switch_branch(target.id), "Switch failed", target.id, moved)

    async def action_undo(self) -> None:
        if await self._idle():
            self._change(self.session.undo, "Undo", lambda done: self._undone(done, "Nothing to undo."))

    async def action_redo(self) -> None:
        if await self._idle():
            self._change(self.session.redo, "Redo", lambda done: self._undone(done, "Nothing to redo."))

    def _undone(self, node: Any, nothing: str) -> None:
        if node is None:
            self.app.notify(nothing)
            return
        self._after_change()
        self._set_paused_state()

    async def action_accept(self) -> None:
        if await self._idle():
            self._change(self.session.accept, "Accept", lambda _: self._accepted())

    def _accepted(self) -> None:
        self._after_change(self.view.cursor)
        self._set_paused_state()
        self.app.notify("Path marked done (accepted).", title="Accepted", timeout=3)

    def action_prob_colors(self) -> None:
        self.view.prob_colors = not self.view.prob_colors

    async def action_tree(self) -> None:
        if await self._idle():
            self.app.push_screen(TreeScreen(self.session.tree, self.session.end), self._goto)

    async def action_stats(self) -> None:
        if await self._idle():
            self.app.push_screen(StatsScreen(self.session.tree), self._goto)

    def _goto(self, node_id: str | None) -> None:
        s = self.session
        if not node_id or s is None or self.generating:
            return
        self._move_to(lambda: s.goto(node_id), "Jump failed", node_id)

    def _move_to(
        self, move: Callable[[], None], title: str, node_id: str, moved: Callable[[int], None] | None = None
    ) -> None:
        """Move the current path through ``node_id`` (no model) and save it, as a job; then
        show it, the cursor where ``node_id`` starts, and call ``moved`` with that index. A
        refusal changes nothing; a failed save keeps the move (and is retried)."""
        s = self.session

        def job() -> None:
            move()
            s.save()

        def done(_: Any, error: BaseException | None) -> None:
            if error is not None:
                self.saves.report(error, title)
                if not isinstance(error, SaveError):
                    return
            else:
                self.saves.mark_saved()
            self._invalidate()
            at = len(s.tree.path_tokens(s.tree.node(node_id).parent))
            self._refresh_all(at)
            self._set_paused_state()
            if moved is not None:
                moved(at)

        self.jobs.add(job, done)

    async def action_save(self) -> None:
        if await self._idle():
            self.saves.save(lambda: self.app.notify("Saved.", timeout=2))

    async def action_toggle_adapter(self) -> None:
        """Switch the LoRA adapter on/off for the next continuation (compare base vs adapter
        at a branch point: roll back, toggle, resample)."""
        if not await self._idle():
            return
        engine = self.session.engine
        toggle = getattr(engine, "set_adapter_enabled", None)
        if toggle is None or not getattr(engine, "loaded_adapter", None):
            self.app.notify("No adapter loaded (start with --adapter LORA.gguf).", severity="warning")
            return
        enabled = not getattr(engine, "adapter_enabled", True)
        try:
            toggle(enabled)
        except EngineError as exc:
            self.saves.report(exc, "Adapter")
            return
        self.app.notify(f"Adapter {'on' if enabled else 'off'} for the next continuation.")
        self._show_model()

    def _show_model(self) -> None:
        self.status.model = model_label(self.session.engine)

    def action_task(self, step: int) -> None:
        self.app.call_later(self.app.action_switch_task, step)

    def action_tasks(self) -> None:
        self.app.call_later(self.app.action_open_tasks)

    # ------------------------------------------------------------------ shutdown
    async def shutdown(self) -> None:
        """Stop generating, save, release the task lock."""
        self.closed = True
        worker = self._steer_worker
        if worker is not None:
            try:
                await worker.wait()
            except WORKER_ENDS:
                pass
        await self.pause()
        await self.jobs.settle()
        if self.session is not None:
            self.saves.save_if_dirty()
            await self.jobs.settle()
            self._close_session()

    def _close_session(self) -> None:
        s, self.session = self.session, None
        if s is not None:
            try:
                s.close()
            except OSError as exc:  # the lock file could not be released cleanly
                self.app.notify(str(exc), title="Closing the task", severity="warning")
