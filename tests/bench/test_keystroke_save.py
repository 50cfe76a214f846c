"""The keystroke-while-saving benchmark, tiny: it runs both modes (saves in the job worker,
saves on the UI thread) on a small task and prints its table."""

from __future__ import annotations

from tests.bench import load_bench


def _bench():
    return load_bench("keystroke_save")


def test_keystroke_save_runs_both_modes_and_prints_the_table(capsys):
    bench = _bench()
    assert bench.main(["--steers", "4", "--tokens", "160", "--keys", "6"]) == 0
    out = capsys.readouterr().out
    assert "4 steers, 160 response tokens" in out
    for row in ("saves in the job worker (now)", "saves on the UI thread (before)", "ratio UI thread / job worker"):
        assert row in out, out
    # the UI-thread mode really swapped the job worker, and put it back
    from steer_tui.ui.screens.session_work import SessionWork

    assert SessionWork._job_in_thread.__name__ == "_job_in_thread"
