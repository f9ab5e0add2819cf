"""`--replay OLD --replay-fraction f`: the exact share of old rows in every batch, cycled through the old set
without replacement, the same rows after a resume, each rank its share of one rank-independent batch, and
one-line errors for bad flags."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import MICRO_TRAIN, run_in_process, write_tiny_manifest
from xmodal.errors import UserError
from xmodal.train.batcher import Batcher, replay_positions
from xmodal.train.config import TrainConfig, resolve_config
from xmodal.train.distributed import DistInfo
from xmodal.train.trainer import Trainer


class _Data:
    """n samples whose pixels say which set (channel 1) and which sample (channel 0) they are."""

    def __init__(self, n: int, old: bool, labels: list | None = None) -> None:
        tag = "old" if old else "new"
        self.captions = [[f"{tag} {i} one", f"{tag} {i} two"][: 1 + i % 2] for i in range(n)]
        self.keys = [f"{tag}{i}" for i in range(n)]
        self.labels = labels or [None] * n
        self.images = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
        self.images[:, 0] = torch.arange(n).view(n, 1, 1)
        self.images[:, 1] = int(old)

    def __len__(self) -> int:
        return len(self.keys)


def _tokenizer(texts):
    out = torch.zeros(len(texts), 24, dtype=torch.long)
    for i, t in enumerate(texts):
        out[i, : len(t)] = torch.tensor([ord(c) for c in t][:24])
    return out


def _batcher(main, old, rank=0, world=1, **kw):
    cfg = TrainConfig(data="new", replay="old", **{"batch_size": 8, "replay_fraction": 0.25, **kw})
    return Batcher(main, _tokenizer, cfg, DistInfo(rank=rank, world_size=world), replay=old)


@pytest.mark.parametrize("batch, fraction", [(8, 0.25), (10, 0.2), (12, 0.3), (16, 0.5), (8, 0.1)])
def test_every_batch_replays_exactly_round_f_b_rows_cycling_the_old_set_without_replacement(batch, fraction):
    main, old = _Data(50, False), _Data(13, True)
    b = _batcher(main, old, batch_size=batch, replay_fraction=fraction)
    rows = round(fraction * batch)
    assert b.replay_rows == rows and b.main_rows == batch - rows
    assert b.steps_per_epoch == 50 // (batch - rows)  # an epoch is one pass over the main data
    per_pass = 13 // rows
    drawn = []
    for step in range(3 * per_pass):
        idx = b.indices(step)
        assert len(idx) == batch and int((idx >= 50).sum()) == rows  # the exact share, every step
        assert torch.equal(idx >= 50, replay_positions(batch, rows))
        assert len(set(idx.tolist())) == batch  # no sample twice in a batch
        drawn.append(b.replay_indices(step).tolist())
    for p in range(3):  # each pass: distinct samples, all but the remainder 13 mod R, a fresh order
        seen = [i for step in drawn[p * per_pass : (p + 1) * per_pass] for i in step]
        assert len(seen) == len(set(seen)) == per_pass * rows
    assert drawn[:per_pass] != drawn[per_pass : 2 * per_pass]
    epoch = torch.cat([b.indices(s)[b.indices(s) < 50] for s in range(b.steps_per_epoch)])
    assert len(set(epoch.tolist())) == len(epoch) == b.steps_per_epoch * (batch - rows)


def test_replay_rows_depend_on_seed_and_step_only_so_a_resume_draws_the_same():
    main, old = _Data(40, False), _Data(11, True)
    steps = range(0, 30)
    through = _batcher(main, old)
    want = {s: (through.indices(s), through.caption_index(s), through.get(s)) for s in steps}
    resumed = _batcher(main, old)  # a fresh batcher, as after a resume, starting mid-pass
    for s in [17, 18, 29, 3]:
        idx, cap, (img, tok, lab) = want[s]
        got_img, got_tok, got_lab = resumed.get(s)
        assert torch.equal(resumed.indices(s), idx) and torch.equal(resumed.caption_index(s), cap)
        assert torch.equal(got_img, img) and torch.equal(got_tok, tok) and torch.equal(got_lab, lab)
    other = _batcher(main, old, seed=1)
    assert any(not torch.equal(other.replay_indices(s), through.replay_indices(s)) for s in steps)


def test_replayed_rows_carry_the_old_samples_images_captions_and_labels():
    main = _Data(20, False, labels=["cat", "dog"] * 10)
    old = _Data(9, True, labels=["bird", "cat", None] * 3)
    b = _batcher(main, old)
    for step in range(6):
        img, tok, lab = b.get(step)
        idx = b.indices(step)
        texts = ["".join(chr(c) for c in row.tolist() if c) for row in tok]
        for p, i in enumerate(idx.tolist()):
            is_old, k = i >= 20, i - 20 if i >= 20 else i
            data = old if is_old else main
            assert img[p, 1, 0, 0] == int(is_old) and img[p, 0, 0, 0] == k
            assert texts[p] in data.captions[k]
            names = ["bird", "cat", "dog"]  # one label space over both sets
            want = names.index(data.labels[k]) if data.labels[k] is not None else -1
            assert lab[p] == want


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_gets_its_share_of_the_one_process_batch(world):
    main, old = _Data(60, False), _Data(17, True)
    kw = {"batch_size": 16, "replay_fraction": 0.3, "aug_word_drop": 0.2}  # text augmented per position too
    one = _batcher(main, old, **kw)
    ranks = [_batcher(main, old, rank=r, world=world, **kw) for r in range(world)]
    rows = round(0.3 * 16)
    for step in (0, 5, 11):
        whole = one.get(step)
        parts = [r.get(step) for r in ranks]
        for k in range(3):  # images, tokens, labels: the ranks' slices make up the one-process batch
            assert torch.equal(torch.cat([p[k] for p in parts]), whole[k])
        shares = [int(p[0][:, 1, 0, 0].sum()) for p in parts]  # replayed rows per rank
        assert sum(shares) == rows and max(shares) - min(shares) <= 1


# -- the trainer --------------------------------------------------------------------------------------------


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _cfg(tmp_path, name, **kw):
    return TrainConfig(**{
        "data": str(tmp_path / "new" / "data.jsonl"), "out": str(tmp_path / name), "model": "xm-micro",
        "batch_size": 8, "steps": 6, "precision": "fp32", "progress": False, "log_every": 1, "lr": 1e-3,
        "warmup": 1, "save_every": 3, "replay": str(tmp_path / "old" / "data.jsonl"), "replay_fraction": 0.25,
        **kw,
    })  # fmt: skip


@pytest.fixture
def two_sets(tmp_path):
    write_tiny_manifest(tmp_path / "new", n=24, seed=0)
    write_tiny_manifest(tmp_path / "old", n=10, seed=7)
    return tmp_path


def test_a_resumed_replay_run_draws_the_same_rows_as_an_uninterrupted_one(two_sets):
    tmp = two_sets
    whole = Trainer(_cfg(tmp, "whole")).fit()
    # a crash after the step-3 checkpoint: the run folder as it was then, resumed to the end
    split = tmp / "split"
    shutil.copytree(whole, split)
    (split / "checkpoints" / "step_6.pt").unlink()
    shutil.copy(split / "checkpoints" / "step_3.pt", split / "checkpoints" / "latest.pt")
    resumed = Trainer(_cfg(tmp, "split"), resume=True)
    assert resumed.resume_state["step"] == 3
    resumed.fit()
    a, b = _losses(whole), _losses(tmp / "split")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
    wa = torch.load(whole / "checkpoints" / "latest.pt", weights_only=True)
    wb = torch.load(tmp / "split" / "checkpoints" / "latest.pt", weights_only=True)
    assert all(torch.allclose(wa["model"][k], wb["model"][k], atol=1e-6) for k in wa["model"])
    plain = _losses(Trainer(_cfg(tmp, "plain", replay=None, replay_fraction=None)).fit())
    assert abs(plain[1] - a[1]) > 1e-4  # the replayed rows do enter the batch
    # recorded: config.yaml, the checkpoint, and metrics.jsonl (the old data and the rows per batch)
    saved = yaml.safe_load((whole / "config.yaml").read_text())["train"]
    assert saved["replay"].endswith("old/data.jsonl") and saved["replay_fraction"] == 0.25
    assert wa["replay_fingerprint"] and wa["config"]["replay_fraction"] == 0.25
    rows = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    info = rows[0]["data"]["replay"]
    assert info["samples"] == 10 and info["rows_per_batch"] == 2 and info["fraction"] == 0.25
    assert info["steps_per_pass"] == 5 and [r["replay_pass"] for r in rows[1:7]] == [0] * 5 + [1]
    assert [r["epoch"] for r in rows[1:7]] == [0, 0, 0, 0, 1, 1]  # 24 new rows, 6 per step: 4 steps an epoch


def test_a_resume_refuses_another_fraction_or_other_old_data(two_sets):
    tmp = two_sets
    Trainer(_cfg(tmp, "run", steps=2)).fit()
    with pytest.raises(UserError, match="--replay-fraction 0.5 differs"):
        Trainer(_cfg(tmp, "run", replay_fraction=0.5), resume=True)
    with pytest.raises(UserError, match="--replay-fraction None differs"):  # replay dropped on resume
        Trainer(_cfg(tmp, "run", replay=None, replay_fraction=None), resume=True)
    write_tiny_manifest(tmp / "other", n=10, seed=8)
    with pytest.raises(UserError, match="not the old data this run replayed"):
        Trainer(_cfg(tmp, "run", replay=str(tmp / "other" / "data.jsonl")), resume=True).fit()


def test_replay_without_a_fraction_takes_a_fifth_and_distill_replays_too(two_sets):
    tmp = two_sets
    cfg = resolve_config(
        None, {"data": str(tmp / "new" / "data.jsonl"), "replay": str(tmp / "old" / "data.jsonl")}
    )
    assert cfg.replay_fraction == 0.2
    out = tmp / "cli"
    run_in_process("train", "--data", tmp / "new" / "data.jsonl", "--replay", tmp / "old" / "data.jsonl",
                   "--out", out, *MICRO_TRAIN, "--steps", "1")  # fmt: skip
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["replay_fraction"] == 0.2
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["data"]["replay"]["rows_per_batch"] == round(0.2 * 8)
    # distill is train with a teacher: it replays too, its teacher live (its cache holds --data rows only)
    run_in_process("distill", "--teacher", out, "--student", "xm-micro", "--data", tmp / "new" / "data.jsonl",
                   "--replay", tmp / "old" / "data.jsonl", "--replay-fraction", "0.5", "--out", tmp / "d",
                   *MICRO_TRAIN[2:], "--steps", "2")  # fmt: skip
    first = json.loads((tmp / "d" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["data"]["replay"]["rows_per_batch"] == 4 and first["teacher"]["cache"] == "live"
    new = tmp / "new" / "data.jsonl"
    p = run_in_process("distill", "--teacher", out, "--student", "xm-micro", "--data", new,
                       "--replay", tmp / "old" / "data.jsonl", "--teacher-cache", "on", "--out", tmp / "d2",
                       *MICRO_TRAIN[2:], "--steps", "1", check=False)  # fmt: skip
    assert p.returncode == 2 and "--teacher-cache on" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--replay-fraction", "0.3"], "--replay-fraction 0.3 needs --replay"),
        (["--replay", "OLD", "--replay-fraction", "1.5"], "--replay-fraction 1.5: the share"),
        (["--replay", "OLD", "--replay-fraction", "0"], "in (0, 1)"),
        (["--replay", "nope/old.jsonl"], "--replay nope/old.jsonl: not found"),
        (["--replay", "OLD", "--replay-fraction", "0.05"], "rounds to no replayed row"),
        (["--replay", "OLD", "--replay-fraction", "0.95"], "leaves no row for --data"),
        (["--replay", "OLD", "--replay-fraction", "0.5", "--batch-size", "32"], "fewer than the 16 rows"),
    ],
)
def test_bad_replay_flags_are_one_line_errors(two_sets, args, needle):
    tmp = two_sets
    args = [str(tmp / "old" / "data.jsonl") if a == "OLD" else a for a in args]
    base = ["train", "--data", tmp / "new" / "data.jsonl", "--out", tmp / "r", *MICRO_TRAIN, "--steps", "1"]
    p = run_in_process(*base, *args, check=False)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and needle in err[0] and "Traceback" not in p.stderr, p.stderr


@pytest.mark.slow
def test_two_processes_replay_exactly_as_one(two_sets):
    """torchrun, 2 gloo processes (4 rows each, their replay share among them) against one process."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    tmp = two_sets
    common = ["train", "--data", str(tmp / "new" / "data.jsonl"), "--replay", str(tmp / "old" / "data.jsonl"),
              "--replay-fraction", "0.375", *MICRO_TRAIN, "--steps", "4", "--log-every", "1",
              "--aug-crop-scale", "0.8", "--aug-word-drop", "0.1"]  # fmt: skip
    run_in_process(*common, "--out", tmp / "one")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
         "-m", "xmodal", *common, "--out", str(tmp / "two")],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _losses(tmp / "one"), _losses(tmp / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)
