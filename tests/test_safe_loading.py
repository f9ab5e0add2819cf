"""Loading never executes code: a checkpoint or --pretrained file holding a pickled object that would run
code is refused with a one-line error, and the code never runs."""

import json

import torch

from tests.conftest import MICRO_TRAIN, assert_one_line_error, run_cli, run_in_process


class _CreatesAFile:
    """Unpickling this calls open(path, "w"): the file appears if the loader executes pickled code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_checkpoint_and_pretrained_file_are_refused_not_executed(tiny_manifest, tmp_path):
    run = tmp_path / "run"
    common = [
        "--data",
        str(tiny_manifest),
        *MICRO_TRAIN,
    ]
    run_in_process("train", *common, "--steps", "1", "--out", str(run))
    marker = tmp_path / "pwned"
    latest = run / "checkpoints" / "latest.pt"
    real = torch.load(latest, weights_only=True)
    latest.unlink()  # a hard link to step_1.pt: write a new file instead of through the link
    torch.save({**real, "model": _CreatesAFile(marker)}, latest)

    assert_one_line_error(
        run_in_process("eval", str(run), "--data", str(tiny_manifest), check=False), "latest.pt"
    )
    # export's refusal in a real `python -m xmodal` process (the entry point's one-line contract)
    assert_one_line_error(run_cli("export", str(run), str(tmp_path / "exp"), check=False), "latest.pt")
    assert_one_line_error(
        run_in_process("train", *common, "--steps", "2", "--out", str(run), "--resume", check=False),
        "latest.pt",
    )
    crafted = tmp_path / "weights.pt"
    torch.save({"state_dict": _CreatesAFile(marker)}, crafted)
    assert_one_line_error(
        run_in_process(
            "train",
            *common,
            "--steps",
            "1",
            "--out",
            str(tmp_path / "r2"),
            "--pretrained",
            str(crafted),
            check=False,
        ),
        "--pretrained",
    )
    assert not marker.exists()
    # the same files load when they hold weights only
    torch.save(real, latest)
    p = run_in_process("eval", str(run), "--data", str(tiny_manifest), "--json", str(tmp_path / "e.json"))
    assert json.loads((tmp_path / "e.json").read_text())["meta"]["random_init"] is False
    assert "warning" not in p.stderr
