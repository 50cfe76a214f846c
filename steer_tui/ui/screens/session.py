"""The steering screen: a view over one headless ``Session``, and what each key does.

``SessionWork`` (its base) owns the session and runs everything that touches the model
or the disk in thread workers; this class lays out the widgets, draws what the workers
report (streamed tokens, finished steers and jobs) and turns keys into session work. A
steering key pressed while streaming first pauses; one pressed while jobs are queued
waits for them, so keys keep their order. A failed save keeps the work in memory, says
so and is retried (``SaveKeeper``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Footer, Static

from steer_tui.core.session_errors import SaveError
from steer_tui.core.token_view import TokenInfo
from steer_tui.core.stats import count_steers
from steer_tui.ui.keys import SESSION_KEYS, bindings
from steer_tui.ui.path_model import PathView, Piece, last_end, path_view, sibling_branch, steer_point
from steer_tui.ui.render import one_line
from steer_tui.ui.screens.alternatives import AlternativesScreen, alternatives
from steer_tui.ui.screens.session_work import SessionWork
from steer_tui.ui.screens.stats import StatsScreen
from steer_tui.ui.screens.tree import TreeScreen
from steer_tui.ui.widgets.correction import CorrectionBar
from steer_tui.ui.widgets.status import CursorInfo, StatusBar, cursor_text, model_label, prompt_line
from steer_tui.ui.widgets.token_view import TokenView

END_STATES = {"eos": "ended (eos)", "length": "paused (max tokens)", "context": "context full"}


class SessionScreen(SessionWork):
    """One task: the token view, the correction editor, the cursor info and status bars."""

    BINDINGS = bindings(SESSION_KEYS)

    def __init__(self, loader: Callable[[], Any], *, task_label: str = "", autostart: bool = True) -> None:
        super().__init__(loader)
        self.task_label = task_label
        self.autostart = autostart
        self._path: PathView | None = None

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

    def on_session_work_loaded(self, event: SessionWork.Loaded) -> None:
        if event.error is not None:
            self.status.state = "error"
            self.query_one("#prompt-line", Static).update(Text(one_line(str(event.error)), style="bold red"))
            self.app.notify(str(event.error), title="Could not open the task", severity="error", timeout=10)
            return
        self.session = event.session
        if self.closed:  # the user left before it loaded
            self._close_session()
            return
        for warning in self.session.warnings:
            self.app.notify(str(warning), title="Model", severity="warning", timeout=10)
        self._refresh_all()
        self._show_model()
        self.status.ctx_limit = self.session.engine.n_ctx
        self.status.save_state = "read-only" if self.read_only else "saved"
        # a new task starts streaming at once; a reopened one waits where it stopped (it
        # was paused for a reason): space continues
        fresh = self.session.end is None and not self.session.tree.nodes
        if self.autostart and fresh and not self.read_only:
            self.start_generation()
        else:
            self._set_paused_state()

    # ------------------------------------------------------------------ drawing
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

    # ------------------------------------------------------------------ changes
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
        if self.read_only:
            self.app.notify("This task is open read-only.", severity="warning")
            return
        self.status.stream_started()
        self.view.show_cursor = False
        self.view.cursor = self.view.n_tokens
        self.status.state = "streaming"
        self._invalidate()
        self._update_cursor_info()
        self._start_stream()

    def on_session_work_streamed(self, event: SessionWork.Streamed) -> None:
        if event.gen != self._gen:
            return  # a batch from a stream that pause() already settled: the view has it
        view = self.view
        at_end = view.scroll_offset.y >= view.max_scroll_y - 1
        view.append([Piece(t.text, "model", t.logprob) for t in event.tokens])
        view.set_reactive(TokenView.cursor, view.n_tokens)
        if at_end:
            view.scroll_to_end()
        self.status.streamed(len(event.tokens), len(self.session.tree.prompt_tokens) + view.n_tokens)

    def on_session_work_stream_ended(self, event: SessionWork.StreamEnded) -> None:
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
        if await self._stop_stream():
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
    def on_session_work_steer_done(self, event: SessionWork.SteerDone) -> None:
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

        self.status.state = "steering"
        self._run_steer(steer, title, at)  # the UI stays responsive; generation follows

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
        if self.read_only:
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
        if not engine.loaded_adapter:
            self.app.notify("No adapter loaded (start with --adapter LORA.gguf).", severity="warning")
            return
        enabled = not engine.adapter_enabled

        def done(_: Any, error: BaseException | None) -> None:
            if error is not None:
                self.saves.report(error, "Adapter")
                return
            self.app.notify(f"Adapter {'on' if enabled else 'off'} for the next continuation.")
            self._show_model()

        self.jobs.add(lambda: engine.set_adapter_enabled(enabled), done)  # llama.cpp: off the UI thread

    def _show_model(self) -> None:
        self.status.model = model_label(self.session.engine)

    def action_task(self, step: int) -> None:
        self.app.call_later(self.app.action_switch_task, step)

    def action_tasks(self) -> None:
        self.app.call_later(self.app.action_open_tasks)
