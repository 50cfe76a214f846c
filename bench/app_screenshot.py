"""Save docs/screenshot.svg (and .png when rsvg-convert is installed): the app on the
bundled model after one steer, probability colouring on, the cursor on a token.

    python bench/app_screenshot.py [--out docs/screenshot.svg]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


async def run(out: Path) -> None:
    from steer_tui.core.engine import open_engine
    from steer_tui.core.models import default_model_path
    from steer_tui.ui.app import make_app
    from steer_tui.ui.config import UIConfig
    from steer_tui.ui.session_factory import SessionFactory

    engine = open_engine(default_model_path(), n_ctx=1024)
    factory = SessionFactory(
        store=tempfile.mkdtemp(prefix="steer-shot-"), engine=engine,
        sampling={"temperature": 0, "seed": 1, "max_tokens": 60}, annotator="docs",
    )
    app = make_app(session_factory=factory, config=UIConfig(), prompt="Give four examples of fruit, one line each.")
    async with app.run_test(size=(90, 24)) as pilot:

        async def idle() -> None:
            while True:
                await pilot.pause(0.05)
                scr = app.session_screen
                if scr and scr.session is not None and not scr.generating and not scr.steering and scr.status.state not in ("loading", "steering"):
                    return

        await idle()
        scr = app.session_screen
        text = scr.view.text()
        # correct the second item: put the cursor on the token after "2."
        target = text.find("2.") + 2
        index = 0
        seen = 0
        while index < scr.view.n_tokens and seen < target:
            seen += len(scr.view.token_text(index))
            index += 1
        await pilot.press("home", *["right"] * index, "enter", *" Mango", "enter")
        await idle()
        await pilot.press("p", "home", *["right"] * 6)
        scr.status.tokens_per_s = 0.0
        app.clear_notifications()
        await pilot.pause(0.2)
        app.save_screenshot(filename=out.name, path=str(out.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/screenshot.svg")
    out = Path(ap.parse_args().out)
    out.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(run(out))
    print(f"wrote {out}")
    if shutil.which("rsvg-convert"):
        # rsvg drops leading non-breaking spaces unless told to preserve them
        fixed = out.read_text(encoding="utf-8").replace("<svg ", '<svg xml:space="preserve" ', 1)
        with tempfile.NamedTemporaryFile("w", suffix=".svg", delete=False, encoding="utf-8") as fh:
            fh.write(fixed)
        png = out.with_suffix(".png")
        subprocess.run(["rsvg-convert", "-o", str(png), fh.name], check=True)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
