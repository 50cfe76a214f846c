"""The token view on its own: wrapping, incremental layout, cursor moves, literal text."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from textual.app import App, ComposeResult

from steer_tui.ui.render import one_line, visible
from steer_tui.ui.path_model import Piece
from steer_tui.ui.widgets.token_view import TokenView


class ViewApp(App[None]):
    def compose(self) -> ComposeResult:
        yield TokenView()


def pieces(texts, author="model"):
    return [Piece(t, author, -0.5) for t in texts]


async def test_wraps_and_moves_by_token_word_line():
    app = ViewApp()
    async with app.run_test(size=(24, 10)) as pilot:
        tv = app.query_one(TokenView)
        tv.focus()
        texts = ["Hello", ",", " world", "!\n", "\n", "Line", " two", " is", " a", " longer", " one", "."]
        tv.set_pieces(pieces(texts))
        await pilot.pause()
        lines = tv.visible_lines()
        width = tv.scrollable_content_region.width
        assert all(len(line) <= width for line in lines)
        assert lines[0] == "Hello, world! "
        assert lines[1] == " "
        assert "".join(tv.token_text(i) for i in range(tv.n_tokens)) == "".join(texts)
        assert tv.cursor == tv.n_tokens  # set_pieces puts the cursor at the end
        await pilot.press("home")
        assert tv.cursor == 0
        await pilot.press("right")
        assert tv.cursor == 1
        await pilot.press("ctrl+right")
        assert tv.token_text(tv.cursor) == " world"
        await pilot.press("down")  # onto the empty line (the "\n" token)
        assert tv.token_text(tv.cursor) == "\n"
        await pilot.press("down")
        assert tv.token_text(tv.cursor) == "Line"
        await pilot.press("up", "up")
        assert tv.cursor in (0, 1, 2)  # back on the first line
        await pilot.press("end")
        assert tv.cursor == tv.n_tokens
        await pilot.press("ctrl+left")
        assert tv.token_text(tv.cursor) in (" one", ".")


async def test_incremental_layout_equals_full_layout():
    app = ViewApp()
    rnd = random.Random(3)
    vocab = [" a", "bb", " ccc", "\n", " dddddddddddddddddddddddddddd", "é", "日本語", "x\ny", "", "\t", "[b]"]
    async with app.run_test(size=(30, 10)):
        tv = app.query_one(TokenView)
        all_pieces: list[Piece] = []
        for step in range(300):
            batch = [Piece(rnd.choice(vocab)) for _ in range(rnd.randint(1, 6))]
            if rnd.random() < 0.1:
                batch.insert(0, Piece("rejected text\nwith newline", "rejected"))
            all_pieces += batch
            tv.append(batch)
            if rnd.random() < 0.05:
                tv.set_pending(rnd.randint(0, tv.n_tokens), "typed\ttext")
                tv.set_pending(None)
        incremental = tv.visible_lines()
        tv.set_pieces(all_pieces)
        assert incremental == tv.visible_lines()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=st.sampled_from(list("ab \n\t日é\x1b[]")), max_size=6), max_size=60), st.integers(5, 40))
def test_layout_keeps_every_cell_and_fits_width(texts, width):
    # the pure layout (no app): every visible character is laid out once, no line too wide
    tv = TokenView()
    tv._wrap_width = lambda: width  # type: ignore[method-assign]
    tv.set_pieces([Piece(t) for t in texts])
    from rich.cells import cell_len

    lines = tv.visible_lines()
    assert all(cell_len(line) <= width for line in lines)
    laid = "".join(frag for line in tv._lines for key, frag in line if key >= 0)
    assert laid == "".join(visible(t) for t in texts)


async def test_pending_correction_shows_inline_and_strikes_the_rest():
    app = ViewApp()
    async with app.run_test(size=(40, 6)):
        tv = app.query_one(TokenView)
        tv.set_pieces(pieces(["one", " two", " three"]))
        tv.set_pending(1, " TYPED")
        text = "".join(tv.visible_lines())
        assert text.index("one") < text.index("TYPED") < text.index("two")
        style = tv._style_for(tv._tok_item[2], False)
        assert style.strike
        tv.set_pending(None)
        assert "TYPED" not in "".join(tv.visible_lines())
        assert not tv._style_for(tv._tok_item[2], False).strike


async def test_markup_and_escapes_render_literally():
    app = ViewApp()
    nasty = ["[bold]B[/bold]", " [link=https://evil.example]x[/link]", " \x1b[31mred\x1b[0m", " \x1b]52;c;SGVsbG8=\x07", " \u202eabc", " \r"]
    async with app.run_test(size=(80, 6)) as pilot:
        tv = app.query_one(TokenView)
        tv.set_pieces(pieces(nasty))
        await pilot.pause()
        shown = "".join(tv.visible_lines())
        assert "[bold]B[/bold]" in shown and "[link=https://evil.example]x[/link]" in shown
        assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown and "\r" not in shown
        assert "\\x1b[31mred" in shown and "\\u202e" in shown
        # and what is drawn on the screen is the same literal text, unstyled by the markup
        strip = tv.render_line(0)
        drawn = "".join(seg.text for seg in strip)
        assert "[bold]B[/bold]" in drawn
        assert not any(seg.style and seg.style.link for seg in strip)
        assert not any(seg.style and seg.style.bold for seg in strip if "B" in seg.text and tv.cursor != 0)


def test_one_line_and_visible():
    assert one_line("a\nb\x1b[0m", 100) == "a↵b\\x1b[0m"
    assert one_line("x" * 10, 5) == "xxxx…"
    assert visible("tab\there") == "tab→here"
