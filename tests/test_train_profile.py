"""RUN/profile.json: where a training command's wall time went, phase by phase, adding up to the whole."""

from __future__ import annotations

import json

from conftest import MICRO_TRAIN, run_in_process, write_tiny_manifest

from xmodal.train.profile import PHASES, Phases, process_age_s


def test_profile_phases_add_up_to_the_wall_time(tmp_path):
    data = write_tiny_manifest(tmp_path / "d", n=16)
    out = tmp_path / "run"
    r = run_in_process("train", "--data", data, "--val", data, "--out", out, *MICRO_TRAIN, "--steps", "3",
                       "--save-every", "1")  # fmt: skip
    rep = json.loads((out / "profile.json").read_text())
    phases = rep["phases_s"]
    assert set(phases) <= {*PHASES, "other"}
    assert {"startup", "model", "data", "batcher", "steps", "validation", "checkpoints", "finish"} <= set(
        phases
    )
    assert all(v >= 0 for v in phases.values())
    assert abs(sum(phases.values()) - rep["wall_s"]) < 0.01  # rounding only
    assert phases["steps"] > 0 and phases["checkpoints"] > 0 and phases["validation"] > 0
    assert rep["steps"] == 3 and rep["samples"] == 3 * 8
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("time: "))  # the phases of >= 0.05 s
    assert all((f"{k} {v:.1f} s" in line) == (v >= 0.05) for k, v in phases.items())


def test_phases_time_what_runs_inside_them(monkeypatch):
    from xmodal.train import profile

    clock = iter([99.0, 100.0, 101.0, 103.5, 110.0, 120.0])
    monkeypatch.setattr("xmodal.train.profile.time.perf_counter", lambda: next(clock))
    monkeypatch.setattr("xmodal.train.profile.process_age_s", lambda: 1.0)
    monkeypatch.setattr(profile, "_command", {})
    profile.mark_command_start()  # at 99, the process 1 s old: start-up = 1 + (100 − 99) = 2 s
    p = Phases()  # t0 = 100
    with p("data"):  # 101 → 103.5
        pass
    rep = p.report(steps=1, samples=8)  # now = 110: 10 s since t0, plus 2 s of start-up
    assert rep["wall_s"] == 12.0
    assert rep["phases_s"] == {"startup": 2.0, "data": 2.5, "other": 7.5}
    monkeypatch.setattr(profile, "_command", {})
    assert "startup" not in Phases().seconds  # the trainer used from Python: no command start-up


def test_process_age_is_plausible():
    age = process_age_s()
    assert age is None or 0 <= age < 24 * 3600
