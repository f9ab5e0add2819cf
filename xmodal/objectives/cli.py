"""`xmodal objectives`: every registered objective, its parameters and its paper."""

import typer


def objectives(
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON."),
) -> None:
    """List the training objectives (use them with `xmodal train --objective NAME[:WEIGHT]+…`)."""
    import json

    from xmodal.objectives.registry import describe

    rows = describe()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="xmodal objectives", show_lines=True)
    for col in ("name", "what it does", "parameters", "needs", "with --accum-steps", "paper"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r["name"],
            r["description"],
            ", ".join(r["params"]) or "–",
            ", ".join(r["needs"]),
            "yes" if r["accumulation"] else "no",
            r["paper"],
        )
    Console(width=160).print(table)


def register(app: typer.Typer) -> None:
    app.command("objectives")(objectives)
