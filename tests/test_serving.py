"""The metrics folder of one server's life: made at start, removed at its
end, and a killed server's removed by the next to start."""

from __future__ import annotations

import os
import time

from service import serving


def test_folders_of_stopped_servers_are_removed_and_the_rest_kept(tmp_path):
    live, dead = os.getpid(), 2**22 + 7  # above Linux's largest pid
    names = {
        "alive": f"{serving.PREFIX}{live}-abc",
        "dead": f"{serving.PREFIX}{dead}-def",
        "old": f"{serving.PREFIX}x1y2z3",
        "recent": f"{serving.PREFIX}q9w8e7",
        "other": "someone-elses-folder",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "counter_1.db").write_bytes(b"")
    day_and_more = time.time() - serving.LEGACY_STALE_SECONDS - 60
    os.utime(tmp_path / names["old"], (day_and_more, day_and_more))

    removed = serving.remove_stale(str(tmp_path))

    assert sorted(removed) == sorted(str(tmp_path / names[n]) for n in ("dead", "old"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names[n] for n in ("alive", "recent", "other")
    )


def test_a_server_makes_its_own_folder_and_removes_only_that(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(serving.tempfile, "tempdir", None)  # read TMPDIR again
    env: dict[str, str] = {}
    folder = serving.metrics_folder(env)
    assert os.path.isdir(folder) and os.path.dirname(folder) == str(tmp_path)
    assert os.path.basename(folder).startswith(f"{serving.PREFIX}{os.getpid()}-")
    # The same master reading its settings again keeps it.
    assert serving.metrics_folder(env) == folder
    serving.remove_own(env)
    assert not os.path.exists(folder)


def test_a_folder_the_operator_chose_is_theirs(tmp_path):
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    assert serving.metrics_folder(env) == str(tmp_path)
    serving.remove_own(env)
    assert tmp_path.is_dir()


def test_a_folder_inherited_from_another_master_is_not_reused(tmp_path, monkeypatch):
    # After SIGUSR2 the new master inherits the old one's environment; the
    # old one removes its folder when it stops, so the new one needs its own.
    monkeypatch.setattr(serving.tempfile, "tempdir", str(tmp_path))
    inherited = tmp_path / f"{serving.PREFIX}1-old"
    inherited.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(inherited), serving.OWNER: "1"}
    folder = serving.metrics_folder(env)
    assert folder != str(inherited) and env[serving.OWNER] == str(os.getpid())
    serving.remove_own(env)
