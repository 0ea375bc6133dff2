"""Copy the current benchmark tables from benchmarks/results/*.md into README.md and docs/*.md.

A page marks each generated block with ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->``;
this script replaces what stands between the markers with ``benchmarks/results/NAME.md``: headings
moved three levels down, image links made relative to the page, and long sections
(profiles) left in the results file. Run it after any ``locallearn bench ...``:

    python benchmarks/update_readme.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SKIP_SECTIONS = ("Profiles",)  # too long for the README; they stay in the results file
MARKER = re.compile(r"(<!-- results:([\w.-]+) -->\n)(.*?)(<!-- /results:\2 -->)", re.S)


def render(name: str, prefix: str = "") -> str:
    path = RESULTS / f"{name}.md"
    if not path.is_file():
        raise SystemExit(f"update_readme: {path} does not exist; run the benchmark first")
    out, skipping = [], False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            skipping = line[3:].strip().startswith(SKIP_SECTIONS)
        if skipping:
            continue
        if line.startswith("#"):
            line = "###" + line
        line = re.sub(r"\]\(([\w.-]+\.(?:png|csv|md))\)", rf"]({prefix}benchmarks/results/\1)", line)
        out.append(line)
    text = "\n".join(out).strip() + "\n"
    note = f"_Generated from `benchmarks/results/{name}.md` by `python benchmarks/update_readme.py`._\n\n"
    return note + text


def main() -> int:
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        prefix = "../" if page.parent.name == "docs" else ""
        text = page.read_text()
        new, count = MARKER.subn(lambda m, p=prefix: m[1] + render(m[2], p) + m[4], text)
        if count:
            page.write_text(new)
            print(f"updated {count} generated block(s) in {page.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
