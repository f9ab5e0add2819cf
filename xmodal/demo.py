"""`xmodal demo`: the whole loop on built-in data in a few CPU minutes — shapes data, a tiny CLIP,
test-split retrieval, printed as a table."""

from pathlib import Path

import typer


def demo(
    out: str = typer.Option("xmodal-demo", help="Folder for the data and the run."),
    steps: int = typer.Option(400, help="Training steps (batch 128)."),
    n_train: int = typer.Option(8000, help="Training images to generate."),
    model: str = typer.Option("xm-tiny", help="Model config."),
    seed: int = typer.Option(0),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    serve: bool = typer.Option(True, "--serve/--no-serve", help="Start the search server at the end."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8765),
) -> None:
    """Shapes data → train a tiny CLIP → test-split retrieval → search index → search server."""
    from rich.console import Console
    from rich.table import Table

    from xmodal.data import load_dataset, make_shapes
    from xmodal.eval import evaluate
    from xmodal.index import build_index
    from xmodal.train.config import TrainConfig
    from xmodal.train.trainer import Trainer

    console = Console()
    root = Path(out)
    console.print(f"[bold]1/4[/] shapes data → {root / 'data'}")
    splits = make_shapes(root / "data", n_train=n_train, n_val=500, n_test=1000, image_size=64, seed=seed)
    cfg = TrainConfig(
        data=str(splits["train"]),
        val=str(splits["val"]),
        out=str(root / "run"),
        model=model,
        steps=steps,
        batch_size=128,
        lr=1e-3,
        warmup=min(100, steps // 10),
        weight_decay=0.1,
        eval_every=max(1, steps // 4),
        save_every=max(1, steps // 4),
        log_every=10,
        seed=seed,
        progress=progress,
    )
    console.print(f"[bold]2/4[/] training {model} for {steps} steps → {cfg.out}")
    resume = (Path(cfg.out) / "checkpoints" / "latest.pt").is_file()  # a re-run continues or reuses it
    trainer = Trainer(cfg, resume=resume)
    run = trainer.fit()
    console.print("[bold]3/4[/] test-split retrieval (1,000 images)")
    test = load_dataset(splits["test"], trainer.encoder.image_size, progress=False)
    result = evaluate(trainer.encoder, test, tasks=("retrieval",))
    table = Table(title=f"{model} on shapes test ({len(test)} images)")
    table.add_column("direction")
    for k in ("R@1", "R@5", "R@10"):
        table.add_column(k, justify="right")
    r = result["retrieval"]
    for name, key in (("text → image", "t2i"), ("image → text", "i2t")):
        table.add_row(name, *(f"{100 * r[key][k]:.1f}" for k in ("R@1", "R@5", "R@10")))
    console.print(table)
    console.print(f"chance R@1 ≈ {100 / len(test):.1f}% · run: {run} · curve: {run / 'loss.png'}")
    index_dir = root / "index"
    console.print(f"[bold]4/4[/] search index of the test images → {index_dir}")
    build_index(
        trainer.encoder,
        test,
        index_dir,
        kind="flat",
        model_source=str(run),
        caption_gallery=True,
        progress=progress,
    )
    console.print(f'try: xmodal search {index_dir} "a small red circle left of a large blue square"')
    if serve:
        from xmodal.serve import run_server

        console.print(f"serving on http://{host}:{port}/ (Ctrl-C to stop)")
        run_server(index_dir, host=host, port=port)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
