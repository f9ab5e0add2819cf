"""`xmodal distill`: exact under data parallelism and accumulation, the teacher cache reused and invalidated,
cached features equal to the teacher's own, the student an ordinary run that exports to open_clip."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import yaml

from tests.conftest import REPO, run_in_process, write_tiny_manifest
from tests.test_train import losses, max_weight_diff, terms
from xmodal.data import load_dataset
from xmodal.models import load_encoder
from xmodal.train.config import TrainConfig
from xmodal.train.trainer import Trainer

FAST = ["--precision", "fp32", "--no-progress", "--batch-size", "8", "--lr", "1e-3", "--warmup", "1"]


def teacher_run(folder: Path, data: Path, model: str = "xm-tiny", seed: int = 0) -> Path:
    run_in_process(
        "train", "--data", data, "--out", folder, "--model", model, "--steps", "4", "--seed", seed, *FAST
    )
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny manifest (40-px images) and an xm-tiny teacher (64 px, 128-d) trained on it briefly."""
    root = tmp_path_factory.mktemp("distill")
    data = write_tiny_manifest(root / "tiny")
    return data, teacher_run(root / "teacher", data)


def step0(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


def distill(data, teacher, out, *extra):
    run_in_process(
        "distill",
        "--teacher",
        teacher,
        "--student",
        "xm-micro",
        "--data",
        data,
        "--out",
        out,
        "--steps",
        "3",
        *FAST,
        *extra,
    )
    return out


@pytest.mark.parametrize(
    "aug",
    [  # the cached teacher features are also checked in one process (test_teacher_cache_is_reused_…)
        pytest.param([], marks=pytest.mark.slow),
        ["--aug-crop-scale", "0.8", "--aug-word-drop", "0.1"],
    ],
    ids=["cached", "live"],
)
def test_two_process_gloo_equals_single_process(setup, tmp_path, aug):
    """Global batch 8: 2 processes of 4 vs one; affinity spans the global batch. The teacher is 128-d and
    the student 32-d, so `feature` trains a projection too."""
    data, teacher = setup
    common = [
        "distill",
        "--teacher",
        str(teacher),
        "--student",
        "xm-micro",
        "--data",
        str(data),
        *FAST,
        "--steps",
        "4",
        "--log-every",
        "1",
        "--objective",
        "clip+affinity+feature:0.5",
        *aug,
    ]
    single, double = tmp_path / "single", tmp_path / "double"
    run_in_process(*common, "--out", single)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29523",
            "-m",
            "xmodal",
            *common,
            "--out",
            str(double),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert step0(single)["teacher"]["cache"] == ("live" if aug else "on")
    a, b = losses(single), losses(double)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    ta, tb = terms(single), terms(double)
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5
        assert set(ta[step]) == {"clip", "affinity", "feature"}
        for name in ta[step]:
            assert abs(ta[step][name] - tb[step][name]) < 1e-5, (step, name)
    assert max_weight_diff(single, double) < 1e-5
    assert (
        "feature_proj.weight" in torch.load(single / "checkpoints" / "latest.pt", weights_only=True)["model"]
    )


def test_accumulation_equals_the_full_batch(setup, tmp_path):
    data, teacher = setup
    runs = {}
    for accum in (1, 4):
        cfg = TrainConfig(
            data=str(data),
            out=str(tmp_path / f"a{accum}"),
            model="xm-micro",
            steps=3,
            batch_size=8,
            accum_steps=accum,
            precision="fp32",
            progress=False,
            log_every=1,
            objective="clip+affinity+feature",
            teacher=str(teacher),
            lr=1e-3,
            warmup=1,
        )
        runs[accum] = Trainer(cfg).fit()
    a, b = losses(runs[1]), losses(runs[4])
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a)
    assert max_weight_diff(runs[1], runs[4]) < 1e-5


def test_cached_features_are_the_teachers_own(setup, tmp_path):
    """The cache holds the teacher's embeddings of the images decoded at its own 64 px (the student's are
    32 px) and of every caption, in the training set's order."""
    data, teacher = setup
    cfg = TrainConfig(
        data=str(data),
        out=str(tmp_path / "r"),
        model="xm-micro",
        steps=1,
        batch_size=8,
        precision="fp32",
        progress=False,
        objective="clip+affinity",
        teacher=str(teacher),
    )
    tr = Trainer(cfg)
    tr.fit()
    enc = load_encoder(teacher)
    ds = load_dataset(str(data), enc.image_size, progress=False)
    assert torch.allclose(tr.distill_teacher.image, enc.encode_images(ds.images), atol=1e-6)
    flat = [c for caps in ds.captions for c in caps]
    assert torch.allclose(tr.distill_teacher.text, enc.encode_texts(flat), atol=1e-6)


def test_teacher_cache_is_reused_and_invalidated_by_teacher_or_data(setup, tmp_path):
    data, teacher = setup
    cache = ["--cache-dir", tmp_path / "cache"]  # this test's own: other tests fill the session's
    first = step0(distill(data, teacher, tmp_path / "first", *cache))["teacher"]
    again = step0(distill(data, teacher, tmp_path / "again", "--seed", "1", *cache))["teacher"]
    assert (first["chunks_computed"], first["chunks_reused"]) == (1, 0)
    assert (again["chunks_computed"], again["chunks_reused"]) == (0, 1) and again["folder"] == first["folder"]
    other_teacher = teacher_run(tmp_path / "teacher2", data, seed=3)
    changed = step0(distill(data, other_teacher, tmp_path / "t2", *cache))["teacher"]
    assert changed["chunks_computed"] == 1 and changed["folder"] != first["folder"]
    copy = tmp_path / "data2"
    shutil.copytree(data.parent, copy)
    rows = [json.loads(x) for x in (copy / "data.jsonl").read_text().splitlines()]
    rows[0]["caption"] = ["a caption nobody wrote before"]
    (copy / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    edited = step0(distill(copy / "data.jsonl", teacher, tmp_path / "d2", *cache))["teacher"]
    assert edited["chunks_computed"] == 1 and edited["folder"] != first["folder"]


def test_distilled_student_from_xm_small_exports_to_open_clip_and_evaluates(setup, tmp_path):
    data, _ = setup
    big = teacher_run(tmp_path / "small", data, model="xm-small")
    run = distill(data, big, tmp_path / "student", "--objective", "clip+affinity+feature")
    run_in_process("eval", run, "--data", data, "--task", "retrieval", "--json", tmp_path / "ev.json")
    assert "retrieval" in json.loads((tmp_path / "ev.json").read_text())
    out = tmp_path / "export"
    run_in_process("export", run, out)
    assert "feature_proj" not in (out / "model.json").read_text()
    open_clip.add_model_config(out / "model.json")
    oc, _, _ = open_clip.create_model_and_transforms("model", pretrained=str(out / "open_clip_model.pt"))
    enc = load_encoder(run)
    tok = enc.tokenize(["a red circle", "a blue square"])
    with torch.no_grad():
        assert torch.allclose(
            oc.eval().encode_text(tok, normalize=True),
            enc.encode_texts(["a red circle", "a blue square"]),
            atol=1e-5,
        )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--student", "xm-micro"], "--teacher is required"),
        (["--teacher", "xm-tiny", "--student", "xm-micro"], "--teacher-pretrained"),
        (["--teacher", "TEACHER", "--student", "xm-micro", "--objective", "clip"], "no objective"),
        (
            ["--teacher", "TEACHER", "--student", "xm-micro", "--aug-flip", "0.5", "--teacher-cache", "on"],
            "cannot be cached",
        ),
        (
            ["--teacher", "TEACHER", "--student", "xm-micro", "--teacher-cache", "always"],
            "--teacher-cache always",
        ),
    ],
)
def test_bad_input_is_one_line_error(setup, tmp_path, args, needle):
    data, teacher = setup
    args = [str(teacher) if a == "TEACHER" else a for a in args]
    p = run_in_process(
        "distill", *args, "--data", data, "--out", tmp_path / "r", "--steps", "1", *FAST, check=False
    )
    assert p.returncode == 2 and needle in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_inherited_student_trains_resumes_and_shrinks_again(setup, tmp_path):
    """inherit → distil → inherit again (the multi-stage recipe of docs/distill.md), through the CLI."""
    data, teacher = setup  # xm-tiny: 3 layers of width 128 per tower
    run = tmp_path / "half"
    run_in_process(
        "distill",
        "--student",
        f"inherit:{teacher}:layers=2,width=0.5",
        "--data",
        data,
        "--out",
        run,
        "--steps",
        "2",
        "--log-every",
        "1",
        *FAST,
    )
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["teacher"] == str(teacher) and cfg["train"]["objective"] == "clip+affinity"
    vision, text = cfg["model_config"]["vision_cfg"], cfg["model_config"]["text_cfg"]
    assert (vision["layers"], vision["width"], text["layers"], text["width"]) == (2, 64, 2, 64)
    record = json.loads((run / "inherited" / "inherit.json").read_text())
    assert record["image"]["layers"] == record["text"]["layers"] == [0, 1]  # TinyCLIP: step 3 // 2 = 1
    assert [len(h) for h in record["image"]["heads"]] == [2, 2] and len(record["image"]["residual"]) == 64
    run_in_process(
        "distill",
        "--student",
        f"inherit:{teacher}:layers=2,width=0.5",
        "--data",
        data,
        "--out",
        run,
        "--steps",
        "3",
        "--log-every",
        "1",
        "--resume",
        *FAST,
    )
    assert sorted(losses(run)) == [1, 2, 3]
    # the distilled student shrinks again, taught by the first teacher
    smaller = tmp_path / "quarter"
    run_in_process(
        "distill",
        "--teacher",
        teacher,
        "--student",
        f"inherit:{run}:layers=1",
        "--data",
        data,
        "--out",
        smaller,
        "--steps",
        "2",
        *FAST,
    )
    assert yaml.safe_load((smaller / "config.yaml").read_text())["model_config"]["vision_cfg"]["layers"] == 1


def test_without_a_teacher_train_distils_from_its_own_initial_model(setup, tmp_path):
    """`xmodal train --objective clip+affinity`: the teacher is a frozen copy of the initial model (here
    the distilled-from run's weights, given as --pretrained), so the first step's affinity is 0."""
    data, teacher = setup
    run_in_process("export", teacher, tmp_path / "exp")
    run = tmp_path / "self"
    run_in_process("train", "--data", data, "--out", run, "--model", tmp_path / "exp" / "model.json",
                   "--pretrained", tmp_path / "exp" / "open_clip_model.pt", "--objective", "clip+affinity",
                   "--steps", "2", "--log-every", "1", *FAST)  # fmt: skip
    first, second = terms(run)[1]["affinity"], terms(run)[2]["affinity"]
    assert abs(first) < 1e-6 < second
