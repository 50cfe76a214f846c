"""Crash safety: scripted sessions SIGKILLed at random moments never lose a completed save.

The default run (CI) kills 100 times (FakeEngine Session, the Textual app, the real model;
about 2 minutes on 2 cores);
``--runslow`` or ``STEER_FAULT_KILLS=N`` runs N (>= 200 with --runslow). ``bench/faults.py``
runs the same harness and writes the counts to bench/out/faults.json.
"""

from __future__ import annotations

import json

import pytest

from .conftest import fault_kills
from .killer import FaultReport, kill_chain


def _split(total: int) -> dict[str, int]:
    """70% Session/FakeEngine, 20% app, 10% real model (at least 3 of each)."""
    app = max(3, total // 5)
    real = max(3, total // 10)
    return {"fake": max(3, total - app - real), "app": app, "real": real}


def _check(rep: FaultReport) -> None:
    print(json.dumps(rep.to_dict()))
    assert rep.worker_crashes == 0, rep.problems
    assert rep.corrupt == 0, rep.problems
    assert rep.lost_steers == 0 and rep.lost_nodes == 0, rep.problems
    assert rep.stale_orphans == 0, rep.problems  # the next session's lock removed every orphan
    assert not rep.problems, rep.problems
    # the run covered what it claims: kills hit live sessions, some of them inside a save
    assert rep.files_checked >= rep.kills // 2 and rep.saves_completed > 0, rep.to_dict()
    assert rep.kills_aimed_at_saves >= 1 and rep.kills_mid_save >= 1, rep.to_dict()
    assert rep.orphan_tmp_files <= rep.kills_mid_save, rep.to_dict()  # only a kill inside a save leaves one


@pytest.fixture(scope="module")
def split(request) -> dict[str, int]:
    return _split(fault_kills(100, request.config))


def test_kill_session_on_fake_engine(tmp_path, split):
    rep = kill_chain("fake", tmp_path, "crash-fake", split["fake"], seed=11, max_delay=0.5)
    _check(rep)
    assert rep.steers_checked > 0


def test_kill_textual_app(tmp_path, split):
    rep = kill_chain("app", tmp_path, "crash-app", split["app"], seed=12, max_delay=1.5)
    _check(rep)


def test_kill_session_on_real_model(tmp_path, split, model_path):
    rep = kill_chain("real", tmp_path, "crash-real", split["real"], seed=13, max_delay=10.0)
    _check(rep)


def test_harness_detects_torn_writes(tmp_path):
    """Negative control: with the atomic save replaced by a slow in-place write, the same
    harness finds torn files. (Proves the checks above can fail.)"""
    rep = kill_chain("fake", tmp_path, "crash-unsafe", 8, seed=5, max_delay=0.5, slowfs_every=0,
                     extra_env={"STEER_FAULT_UNSAFE": "1"})
    assert rep.corrupt + rep.lost_steers > 0, rep.to_dict()


def test_orphan_temp_files_are_not_tasks(tmp_path):
    """A kill between the temp-file write and the rename leaves a ``.<id>.json.<pid>.<hex>.tmp``
    file; it is never listed, loaded or exported as a task."""
    from steer_tui.core.store import Store

    from .conftest import build_session

    with build_session(tmp_path) as s:
        path = s.store.task_path(s.task_id)
    orphan = path.with_name(f".{path.name}.99999.abcd1234.tmp")
    orphan.write_bytes(path.read_bytes()[:100])
    tasks = Store(tmp_path).list_tasks()
    assert [t.id for t in tasks] == [s.task_id] and tasks[0].error is None
