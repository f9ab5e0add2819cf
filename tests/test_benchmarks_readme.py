"""The README's benchmark table shows only figures recorded in BENCHMARKS.md: every number of its result
column appears in the body of a result block it cites (between the `<!-- results:NAME -->` markers), and
the CPU it names is the CPU of those blocks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BENCHMARKS = REPO / "BENCHMARKS.md"

# a number not glued to a word before it (so "t2i", "p50", "xm-tiny" are not numbers; "R@10", "ITQ-256" are)
NUMBER = re.compile(r"(?<![\w.\-−])[-−+]?\d[\d,]*(?:\.\d+)?|(?<=[A-Za-z]-)\d[\d,]*(?:\.\d+)?")
BLOCK_HEAD = re.compile(r"^#### .* — (\d{4}-\d{2}-\d{2} \d{2}:\d{2})\s*$", re.M)
STAMP = re.compile(r"(?:(\d{4}-\d{2}-\d{2}) )?(\d{2}:\d{2})")
SCRIPT = re.compile(r"benchmarks/(\w+)\.py")


@dataclass
class Block:
    section: str
    stamp: str
    machine: str
    body: str  # the block without its heading, command and machine lines


def _key(tok: str) -> str:
    """A figure as written, without sign and thousands separators ("−1,719" → "1719")."""
    return tok.replace(",", "").lstrip("-−+")


def recorded_in(tok: str, recorded: set[str]) -> bool:
    """A decimal figure must appear digit for digit (so "2.0" or a rounded "1.9" does not pass for "2" or
    "1.89"); a whole number may also match a block's figure of equal value ("20" for "20.0")."""
    key = _key(tok)
    if key in recorded:
        return True
    return "." not in key and any(float(r) == float(key) for r in recorded)


def numbers(text: str) -> list[str]:
    return [m.group(0) for m in NUMBER.finditer(text)]


def result_blocks(text: str) -> list[Block]:
    """Every block inside a `<!-- results:NAME -->` … `<!-- /results:NAME -->` pair."""
    out = []
    for m in re.finditer(r"<!-- results:(\w+) -->(.*?)<!-- /results:\1 -->", text, re.S):
        section, inner = m.group(1), m.group(2)
        heads = list(BLOCK_HEAD.finditer(inner))
        for i, h in enumerate(heads):
            chunk = inner[h.end() : heads[i + 1].start() if i + 1 < len(heads) else len(inner)]
            lines = chunk.strip("\n").splitlines()
            machine = next((ln for ln in lines if ln.startswith("Machine: ")), "")
            body = "\n".join(ln for ln in lines if not ln.startswith(("Machine: ", "`python ")))
            out.append(Block(section, h.group(1), machine, body))
    return out


def readme_table(text: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, rows) of the first table in the README's `## Benchmarks` section."""
    m = re.search(r"^## Benchmarks\s*$(.*?)(?=^## )", text, re.M | re.S)
    assert m, "README.md has no '## Benchmarks' section"
    lines = [ln for ln in m.group(1).splitlines() if ln.startswith("|")]
    assert len(lines) >= 3, "README's Benchmarks section has no table"

    def cells(ln: str) -> list[str]:
        return [c.strip() for c in ln.strip().strip("|").split(" | ")]

    return cells(lines[0]), [cells(ln) for ln in lines[2:]]


def headline_isa(machine: str) -> str:
    """The ISA a reader must be told about: what decides CPU training speed in that block's machine line."""
    isa = machine.lower()
    if "amx_bf16" in isa:
        return "AMX"
    if "avx512_bf16" in isa:
        return "AVX-512 BF16"
    if "avx512f" in isa:
        return "AVX-512"
    if "avx2" in isa:
        return "AVX2"
    return ""


def _norm(s: str) -> str:
    return re.sub(r"\((R|TM)\)", "", s).replace("  ", " ").strip().lower()


def check(readme: str, benchmarks: str) -> list[str]:
    """Problems of the README table against BENCHMARKS.md (empty = fine)."""
    blocks = result_blocks(benchmarks)
    header, rows = readme_table(readme)
    low = [h.lower() for h in header]
    try:
        col_result = next(i for i, h in enumerate(low) if h.startswith("result"))
        col_cpu = next(i for i, h in enumerate(low) if "measured on" in h)
        col_block = next(i for i, h in enumerate(low) if "block" in h)
    except StopIteration:
        return [f"README benchmark table needs 'result', 'measured on' and 'block' columns, has {header}"]
    problems = []
    for row in rows:
        if len(row) != len(header):
            problems.append(f"row has {len(row)} cells, header {len(header)}: {row}")
            continue
        what = row[0][:60]
        script = SCRIPT.search(row[0])
        if not script:
            problems.append(f"{what}: names no benchmarks/NAME.py script")
            continue
        section = script.group(1)
        cited, day = [], None
        for d, t in STAMP.findall(row[col_block]):
            day = d or day
            if day is None:
                problems.append(f"{what}: block time {t} without a date")
                continue
            cited.append(f"{day} {t}")
        mine = [b for b in blocks if b.section == section and b.stamp in cited]
        missing = sorted(set(cited) - {b.stamp for b in mine})
        if not cited or missing:
            problems.append(f"{what}: cites no result block of section {section} at {missing or 'no time'}")
            continue
        for b in mine:
            cpu = b.machine.removeprefix("Machine: ").split(",")[0]
            if _norm(cpu) not in _norm(row[col_cpu]):
                problems.append(f"{what}: measured on {row[col_cpu]!r}, but block {b.stamp} ran on {cpu!r}")
            isa = headline_isa(b.machine)
            if isa and isa.lower() not in row[col_cpu].lower():
                problems.append(f"{what}: names no {isa} (block {b.stamp}'s ISA) in {row[col_cpu]!r}")
            cores = re.search(r"(\d+)[- ]cores?", row[col_cpu])
            real = re.search(r"(\d+) logical cores", b.machine)
            if cores and real and cores.group(1) != real.group(1):
                problems.append(f"{what}: {cores.group(0)}, but block {b.stamp} had {real.group(0)}")
        recorded = {_key(t) for b in mine for t in numbers(b.body)}
        for tok in numbers(row[col_result]):
            if not recorded_in(tok, recorded):
                problems.append(f"{what}: {tok} is in no cited block of {section} ({', '.join(cited)})")
    return problems


def test_readme_benchmark_table_cites_recorded_figures():
    problems = check(README.read_text(encoding="utf-8"), BENCHMARKS.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)


def _bench_md(machine: str = "AMD EPYC, 2 logical cores, ISA avx512f/avx512_bf16/avx2, 24 GiB RAM") -> str:
    return (
        "# Benchmarks\n\nprose 2.0 outside any block\n\n## train_vs_open_clip\n\n"
        "<!-- results:train_vs_open_clip -->\n\n#### Training — 2026-11-28 02:24\n\n"
        "`python benchmarks/train_vs_open_clip.py --steps 77`  \n"
        f"Machine: {machine}, took 5 s\n\n| ratio | 1.89 |\n| amp | 32.0 |\n\n"
        "<!-- /results:train_vs_open_clip -->\n"
    )


def _readme(
    result: str, cpu: str = "AMD EPYC, 2 cores, AVX-512 BF16", block: str = "2026-11-28 02:24"
) -> str:
    return (
        "# x\n\n## Benchmarks\n\n| benchmark (command) | result | measured on | BENCHMARKS.md block |\n"
        "| --- | --- | --- | --- |\n"
        f"| training (`python benchmarks/train_vs_open_clip.py`) | {result} | {cpu} | {block} |\n"
        "\n## Layout\n"
    )


def test_check_accepts_recorded_figures():
    assert check(_readme("1.89× per step, 32.0× amp"), _bench_md()) == []


@pytest.mark.parametrize(
    "readme,why",
    [
        (_readme("2.0× per step"), "2.0 is in no cited block"),  # in the prose only, not in a block
        (_readme("1.9× per step"), "1.9 is in no cited block"),  # rounded: not the recorded figure
        (
            _readme("5.0× per step"),
            "5.0 is in no cited block",
        ),  # "took 5 s" is the machine line, not a result
        (_readme("77 steps"), "77 is in no cited block"),  # the command line is not a result
        (_readme("1.89×", block="2026-11-28 09:99"), "cites no result block"),
        (_readme("1.89×", cpu="Intel Xeon, 2 cores, AMX"), "ran on 'AMD EPYC'"),
        (_readme("1.89×", cpu="AMD EPYC, 2 cores"), "names no AVX-512 BF16"),
        (_readme("1.89×", cpu="AMD EPYC, 4 cores, AVX-512 BF16"), "had 2 logical cores"),
    ],
)
def test_check_rejects_figures_without_a_block(readme, why):
    problems = check(readme, _bench_md())
    assert any(why in p for p in problems), problems


def test_check_names_the_isa_of_each_cpu():
    xeon = "Intel(R) Xeon(R) Processor, 2 logical cores, ISA avx2/avx512f/avx512_bf16/amx_bf16"
    ok = _readme("1.89×", cpu="Intel(R) Xeon(R) Processor, 2 cores, AMX")
    assert check(ok, _bench_md(xeon)) == []
    zen1 = "AMD EPYC 7551 32-Core Processor, 2 logical cores, ISA avx2 (native bf16: no)"
    assert any(
        "names no AVX2" in p
        for p in check(_readme("1.89×", cpu="AMD EPYC 7551 32-Core Processor, 2 cores"), _bench_md(zen1))
    )
