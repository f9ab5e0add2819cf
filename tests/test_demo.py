"""`xmodal demo` end to end, shrunk to seconds (the full demo is the README's first command)."""

from tests.conftest import run_cli


def test_demo_trains_and_prints_the_recall_table(tmp_path):
    out = tmp_path / "demo"
    p = run_cli(
        "demo",
        "--out",
        str(out),
        "--steps",
        "4",
        "--n-train",
        "256",
        "--model",
        "xm-micro",
        "--no-progress",
        "--no-serve",
    )
    assert "text → image" in p.stdout and "image → text" in p.stdout and "R@10" in p.stdout
    assert (out / "run" / "checkpoints" / "latest.pt").is_file()
    assert (out / "data" / "test.jsonl").is_file()
