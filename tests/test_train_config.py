"""One typed config: YAML values converted or rejected by key, every option a flag, values validated,
and a resume that refuses to continue a different run."""

import inspect
import json

import pytest
import torch
import yaml

from tests.conftest import MICRO_TRAIN, assert_one_line_error, run_cli, run_in_process, write_tiny_manifest
from xmodal.errors import UserError
from xmodal.train import cli
from xmodal.train.config import FIELD_NAMES, resolve_config


def test_yaml_values_are_converted_to_the_field_type_or_rejected_by_key(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("data: d.jsonl\nlr: 1e-3\nbatch_size: '64'\nsteps: 10.0\nlock_text: 'true'\nval: null\n")
    assert yaml.safe_load(conf.read_text())["lr"] == "1e-3"  # what PyYAML gives: a string
    cfg = resolve_config(str(conf), {})
    assert (cfg.lr, cfg.batch_size, cfg.steps, cfg.lock_text, cfg.val) == (1e-3, 64, 10, True, None)
    assert type(cfg.lr) is float and type(cfg.batch_size) is int
    for bad, key in [
        ("lr: fast", "lr"),
        ("batch_size: 1.5", "batch_size"),
        ("lock_text: maybe", "lock_text"),
        ("model: 3", "model"),
        ("steps: [1, 2]", "steps"),
    ]:
        conf.write_text(f"data: d.jsonl\n{bad}\n")
        with pytest.raises(UserError, match=rf"c\.yaml: {key}: expected"):
            resolve_config(str(conf), {})


def test_yaml_type_error_is_one_line_on_the_command_line(tiny_manifest, tmp_path):
    # a real `python -m xmodal` process: the entry point's one-line contract for `train` (nothing printed
    # at import, no traceback); the other refusals below run the same entry point in this process
    conf = tmp_path / "c.yaml"
    conf.write_text("lr: fast\n")
    p = run_cli(
        "train",
        "--config",
        str(conf),
        "--data",
        str(tiny_manifest),
        "--out",
        str(tmp_path / "r"),
        check=False,
    )
    assert_one_line_error(p, "lr")


def test_every_config_field_has_a_flag():
    from xmodal.distill.cli import distill

    params = set(inspect.signature(cli.train).parameters)
    teacher = {"teacher", "teacher_pretrained", "teacher_cache"}  # `xmodal distill`'s own options
    assert teacher <= set(inspect.signature(distill).parameters) and not teacher & params
    missing = sorted(FIELD_NAMES - params - teacher)
    assert not missing, f"TrainConfig fields without a flag: {missing}"
    assert "extra" not in FIELD_NAMES
    assert {
        "beta1",
        "beta2",
        "eps",
        "hf_pooler",
        "lock_image_unlocked_groups",
        "lock_text_unlocked_layers",
    } <= FIELD_NAMES


def test_new_flags_reach_the_run(tiny_manifest, tmp_path):
    out = tmp_path / "r"
    run_in_process(
        "train",
        "--data",
        str(tiny_manifest),
        *MICRO_TRAIN,
        "--steps",
        "1",
        "--out",
        str(out),
        "--beta1",
        "0.8",
        "--beta2",
        "0.95",
        "--eps",
        "1e-8",
        "--lock-image",
        "--lock-image-unlocked-groups",
        "1",
    )
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["train"]["beta1"], saved["train"]["beta2"], saved["train"]["eps"]) == (0.8, 0.95, 1e-8)
    assert saved["model"]["lock_image_unlocked_groups"] == 1
    state = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert tuple(state["optimizer"]["param_groups"][0]["betas"]) == (0.8, 0.95)


BAD = [
    (["--log-every", "0"], "--log-every"),
    (["--save-every", "0"], "--save-every"),
    (["--aug-flip", "1.5"], "--aug-flip"),
    (["--aug-word-drop", "-0.1"], "--aug-word-drop"),
    (["--beta2", "1.0"], "--beta2"),
    (["--eps", "0"], "--eps"),
    (["--eval-every", "5"], "--val"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:99"], "--device"),
]
if not torch.cuda.is_available():
    BAD.append((["--device", "cuda"], "no usable CUDA"))


@pytest.mark.parametrize("args, needle", BAD)
def test_bad_values_are_one_line_errors(tiny_manifest, tmp_path, args, needle):
    p = run_in_process(
        "train",
        "--data",
        str(tiny_manifest),
        *MICRO_TRAIN,
        "--steps",
        "1",
        "--out",
        str(tmp_path / "r"),
        *args,
        check=False,
    )
    assert_one_line_error(p, needle)


def test_val_without_eval_every_evaluates_at_the_end(tiny_manifest, tmp_path):
    out = tmp_path / "r"
    run_in_process(
        "train",
        "--data",
        str(tiny_manifest),
        "--val",
        str(tiny_manifest),
        *MICRO_TRAIN,
        "--steps",
        "2",
        "--out",
        str(out),
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in rows if "val" in r]
    assert [r["step"] for r in vals] == [2] and "R@1" in vals[0]["val"]["retrieval"]["t2i"]


def test_resume_without_checkpoint_refuses_and_keeps_metrics(tiny_manifest, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    p = run_in_process(
        "train",
        "--data",
        str(tiny_manifest),
        *MICRO_TRAIN,
        "--steps",
        "2",
        "--out",
        str(out),
        "--resume",
        check=False,
    )
    assert_one_line_error(p, "--resume")
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_resume_of_a_different_run_is_refused_unless_overridden(tiny_manifest, tmp_path):
    out = tmp_path / "r"
    base = ["train", "--data", str(tiny_manifest), *MICRO_TRAIN, "--out", str(out)]
    run_in_process(*base, "--steps", "2")
    other = write_tiny_manifest(tmp_path / "other", seed=1)
    for args, needle in [
        (["--batch-size", "4"], "--batch-size"),
        (["--seed", "1"], "--seed"),
        (["--data", str(other)], "--data"),
    ]:
        p = run_in_process(*base, "--steps", "3", "--resume", *args, check=False)
        assert_one_line_error(p, needle)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    run_in_process(*base, "--steps", "3", "--resume", "--seed", "1", "--resume-override")
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    run_in_process(*base, "--steps", "4", "--resume")  # the same run resumes as before
