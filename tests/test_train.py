"""Trainer: resume after SIGKILL, 2-process equivalence, cached-feature accumulation, LiT, config."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, run_in_process
from xmodal.train.config import TrainConfig
from xmodal.train.trainer import Trainer

MICRO = ["--model", "xm-micro", "--precision", "fp32", "--no-progress", "--lr", "1e-3", "--warmup", "2"]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def micro_curve(manifest, out: Path, *flags) -> list[float]:
    """Loss per step of 4 logged steps of xm-micro (fp32, batch 8) trained with `flags`, in this process."""
    args = ["--batch-size", "8", "--steps", "4", "--log-every", "1", *flags, "--out", out]
    run_in_process("train", "--data", manifest, *MICRO, *args)
    return list(losses(out).values())


def terms(run: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["losses"] for r in rows if "losses" in r}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["model"]


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    # (FSDP keeps the temperature as a 1-element vector instead of a scalar)
    return max((wa[k].float().reshape(wb[k].shape) - wb[k].float()).abs().max().item() for k in wa)


def test_resume_after_sigkill_reproduces_the_loss_curve(tiny_manifest, tmp_path):
    # 40 samples, batch 8 → 5 steps per epoch; 15 steps = 3 epochs; checkpoints every 3 steps (mid-epoch).
    common = [
        "train",
        "--data",
        str(tiny_manifest),
        *MICRO,
        "--batch-size",
        "8",
        "--steps",
        "15",
        "--save-every",
        "3",
        "--log-every",
        "1",
        "--aug-crop-scale",
        "0.7",
        "--aug-word-drop",
        "0.2",
    ]
    ref = tmp_path / "ref"
    run_in_process(*common, "--out", str(ref))  # the reference and the resume need no real process

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "xmodal", *common, "--out", str(crashed)],
        cwd=REPO,
        env={**os.environ, "XMODAL_TEST_STEP_DELAY": "0.4"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (crashed / "checkpoints" / "step_6.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.5)  # somewhere after step 6, mid-epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(crashed))
    assert 6 <= killed_at < 15

    run_in_process(*common, "--out", str(crashed), "--resume")
    a, b = losses(ref), losses(crashed)
    assert sorted(a) == sorted(b) == list(range(1, 16))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])
    assert max_weight_diff(ref, crashed) < 1e-6


def test_fresh_run_refuses_to_overwrite_and_resume_of_finished_run_is_a_no_op(tiny_manifest, tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(tiny_manifest),
        *MICRO,
        "--batch-size",
        "8",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    run_in_process(*args)
    p = run_in_process(*args, check=False)
    assert p.returncode == 2 and "--resume" in p.stderr and "Traceback" not in p.stderr
    before = losses(out)
    run_in_process(*args, "--resume")
    assert losses(out) == before


@pytest.mark.parametrize(
    "objective, sharding",
    [
        pytest.param("clip", [], marks=pytest.mark.slow),  # (covered by the two clip+… cases below)
        ("siglip", []),
        ("clip", ["--fsdp"]),
        pytest.param(  # (batch-level terms over the global batch: the combination below covers them too)
            "clip+uniformity:0.1+alignment:0.1+multipos:0.5+sdm:0.5", [], marks=pytest.mark.slow
        ),
        (  # everything beyond the pooled features: an EMA model (mod is momentum's ITC and distils mlm),
            # a teacher, tokens, and the fusion encoder (hard negatives and masking over the global batch)
            "clip+mod:0.5(queue=12,momentum=0.9)+cwcl:0.5(targets=teacher)+mixup:0.5(kind=m3col)"
            "+noisy:0.5+filip:0.5(token_fraction=0.5)+itm:1(synth=true)+mlm:0.5(prob=0.3)",
            [],
        ),
    ],
)
def test_two_process_gloo_equals_single_process(tiny_manifest, tmp_path, objective, sharding):
    """Same global batch of 8: torchrun with 2 CPU processes (4 each) vs one process, with replicated
    (data-parallel) or sharded (FSDP) parameters. Tolerance: 1e-5 on losses and weights (float32
    reduction order differs)."""
    common = [
        "train",
        "--data",
        str(tiny_manifest),
        *MICRO,
        "--batch-size",
        "8",
        "--steps",
        "6",
        "--log-every",
        "1",
        "--objective",
        objective,
        "--aug-crop-scale",
        "0.8",
        "--aug-color",
        "0.2",
        "--aug-word-drop",
        "0.1",
    ]
    single, double = tmp_path / "single", tmp_path / "double"
    run_in_process(*common, "--out", str(single))  # only the 2-process run needs real processes
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "xmodal",
            *common,
            *sharding,
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
    a, b = losses(single), losses(double)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    ta, tb = terms(single), terms(double)  # and each objective's term on its own
    assert ta.keys() == tb.keys() and set(ta[1]) == {o.split(":")[0] for o in objective.split("+")}
    for step in ta:
        for name in ta[step]:
            assert abs(ta[step][name] - tb[step][name]) < 1e-5, (step, name)
    assert max_weight_diff(single, double) < 1e-5
    # and the model actually moved: the test would notice a run that trains nothing (a single objective
    # falls in 6 steps; a composite's total need not, its terms pull different ways)
    assert a[6] < a[1] if "+" not in objective else abs(a[6] - a[1]) > 1e-3


@pytest.mark.parametrize(
    "objective",
    [
        "clip",
        "siglip",
        "clip+uniformity:0.1(t=3)+alignment:0.1+multipos:0.5+sdm:0.5",
        "clip+momentum:0.5(queue=12,momentum=0.9)+cwcl:0.5(targets=teacher)+mixup:0.5+noisy:0.5(mode=soft)",
    ],
)
def test_cached_feature_accumulation_equals_the_full_batch(tiny_manifest, tmp_path, objective):
    """GradCache: 4 micro-batches of 2 give the same losses and weights as one batch of 8."""
    runs = {}
    for accum in (1, 4):
        cfg = TrainConfig(
            data=str(tiny_manifest),
            out=str(tmp_path / f"a{accum}"),
            model="xm-micro",
            steps=4,
            batch_size=8,
            accum_steps=accum,
            precision="fp32",
            progress=False,
            log_every=1,
            objective=objective,
            lr=1e-3,
            warmup=1,
            aug_crop_scale=0.8,
        )
        runs[accum] = Trainer(cfg).fit()
    a, b = losses(runs[1]), losses(runs[4])
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5
    assert max_weight_diff(runs[1], runs[4]) < 1e-5


def test_yaml_config_flags_win_and_run_dir_contents(tiny_manifest, tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text(
        yaml.safe_dump({"batch_size": 4, "steps": 3, "lr": 0.01, "model": "xm-micro", "precision": "fp32"})
    )
    out = tmp_path / "run"
    run_in_process(
        "train",
        "--config",
        str(conf),
        "--data",
        str(tiny_manifest),
        "--out",
        str(out),
        "--lr",
        "0.002",
        "--no-progress",
        "--log-every",
        "1",
    )
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (
        saved["train"]["lr"] == 0.002 and saved["train"]["batch_size"] == 4 and saved["train"]["steps"] == 3
    )
    assert saved["model_config"]["embed_dim"] == 32
    assert (out / "checkpoints" / "latest.pt").is_file() and (out / "checkpoints" / "step_3.pt").is_file()
    assert (out / "loss.png").stat().st_size > 1000
    assert list(out.glob("events.out.tfevents.*"))
    assert sorted(losses(out)) == [1, 2, 3]


def test_locked_text_tower_stays_frozen_with_a_hf_tower(tiny_manifest, tmp_path):
    from xmodal.models import minilm_path

    out = tmp_path / "lit"
    cfg = TrainConfig(
        data=str(tiny_manifest),
        out=str(out),
        model="xm-micro",
        hf_text=str(minilm_path()),
        lock_text=True,
        steps=2,
        batch_size=4,
        precision="fp32",
        progress=False,
        lr=1e-3,
        warmup=1,
    )
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    after = trainer.model.state_dict()
    text_keys = [k for k in before if k.startswith("text.transformer.")]
    assert text_keys and all(torch.equal(before[k], after[k]) for k in text_keys)
    head_keys = [k for k in before if k.startswith("text.") and not k.startswith("text.transformer.")]
    assert head_keys and any(not torch.equal(before[k], after[k]) for k in head_keys)  # projection trains
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--data", "nope.jsonl"], "nope.jsonl"),
        (["--objective", "infonce"], "--objective"),
        (["--model", "no-such-model"], "--model"),
        (["--batch-size", "7", "--accum-steps", "2"], "--accum-steps"),
        (["--objective", "clip+itm", "--batch-size", "8", "--accum-steps", "2"], "cached features"),
        (["--objective", "mod+momentum"], "drop momentum"),
        (["--bogus-flag", "1"], "bogus"),
    ],
)
def test_bad_input_is_one_line_error(tiny_manifest, tmp_path, args, needle):
    base = ["train", "--out", str(tmp_path / "r"), "--steps", "1", "--no-progress"]
    if "--data" not in args:
        base += ["--data", str(tiny_manifest)]
    p = run_in_process(*base, *args, check=False)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in p.stderr, p.stderr


@pytest.mark.slow
def test_compiled_towers_give_the_eager_loss_curve(tiny_manifest, tmp_path):
    """--compile (inductor, the towers only, autocast outside the compiled code) trains the same curve as
    eager, to 1e-4: the compiled text tower runs the full context, the eager one trims the padding, and the
    fused kernels sum in another order."""
    common = ["train", "--data", tiny_manifest, *MICRO, "--batch-size", "8", "--steps", "4"]
    common += ["--log-every", "1"]
    run_in_process(*common, "--out", tmp_path / "eager")
    run_in_process(*common, "--compile", "--out", tmp_path / "compiled")
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == [1, 2, 3, 4]
    assert max(abs(eager[s] - compiled[s]) for s in eager) < 1e-4
    assert max_weight_diff(tmp_path / "eager", tmp_path / "compiled") < 1e-4
