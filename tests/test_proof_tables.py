"""benchmarks/proof_tables.py: PROOF lines -> results tables -> the pages' generated blocks."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from benchmarks import proof_tables, update_readme
from tests import proof_report


def report(*args, **kwargs) -> str:
    """A PROOF line as a proof test prints it, kept off stdout: a run of the proof tables over these tests
    must not find made-up results."""
    with contextlib.redirect_stdout(io.StringIO()):
        return proof_report.report(*args, **kwargs)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A stand-in repository: README.md with a proofs block, docs/seg.md with a per-task block."""
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "intro\n<!-- results:proofs -->\nold\n<!-- /results:proofs -->\nend\n"
    )
    (tmp_path / "docs" / "seg.md").write_text(
        "<!-- results:proofs_segmentation -->\n<!-- /results:proofs_segmentation -->\n"
    )
    monkeypatch.setattr(update_readme, "ROOT", tmp_path)
    monkeypatch.setattr(update_readme, "RESULTS", tmp_path / "benchmarks" / "results")
    return tmp_path


def log(tmp_path, name: str, *lines: str):
    path = tmp_path / name
    path.write_text("noise\n" + "\n".join(f"tests/x.py::t {line}" for line in lines) + "\n")
    return path


def test_tables_come_from_the_printed_lines_and_merge_across_runs(repo, capsys) -> None:
    seg = log(
        repo, "seg.log",
        report("segmentation", "dgl", 0, "mIoU", 31.25, 20, frozen=9.7, margin=10, at_init=1.2, steps=150,
               blocks="12.0 31.2", blocks_at_init="0.3 1.2"),
        report("segmentation", "dgl", 1, "mIoU", 29.0, 20, frozen=11.0, margin=10, at_init=1.3, steps=150),
    )  # fmt: skip
    det = log(
        repo,
        "det.log",
        report("detection", "retinanet dgl K=16", 0, "AP50", 55.0, 40, frozen=20.0, margin=15),
    )
    assert proof_tables.main(["--from-log", str(seg)]) == 0
    assert proof_tables.main(["--from-log", str(det)]) == 0  # another run adds its task, keeps the others
    md = (repo / "benchmarks" / "results" / "proofs.md").read_text()
    assert md.index("## segmentation") > md.index("## detection")  # the fixed task order
    assert (
        "| `dgl` | mIoU | 31.2 | 29.0 | 9.7 / 11.0 | >= 20 | 10 | 1.2 / 1.3 | 150 | 12.0 31.2 (0.3 1.2) |"
        in md
    )
    assert "| `retinanet dgl K=16` | AP50 | 55.0 | — | 20.0 | >= 40 | 15 | — | — | — |" in md
    readme = (repo / "README.md").read_text()
    assert "old" not in readme and "55.0" in readme and "31.2" in readme and readme.endswith("end\n")
    seg_page = (repo / "docs" / "seg.md").read_text()
    assert "31.2" in seg_page and "55.0" not in seg_page  # a per-task block holds that task alone
    # a rerun replaces a case's number and says how far it moved
    again = log(repo, "again.log", report("segmentation", "dgl", 0, "mIoU", 30.0, 20, frozen=9.7, margin=10))
    capsys.readouterr()
    proof_tables.main(["--from-log", str(again)])
    assert "segmentation dgl seed 0: 31.25 -> 30.0" in capsys.readouterr().out
    store = [
        json.loads(line)
        for line in (repo / "benchmarks" / "results" / "proofs.jsonl").read_text().splitlines()
    ]
    assert len(store) == 3


def test_a_log_without_proof_lines_stops_with_one_line(repo) -> None:
    empty = log(repo, "empty.log")
    with pytest.raises(SystemExit, match="no PROOF line found"):
        proof_tables.main(["--from-log", str(empty)])


def test_the_given_tests_run_with_their_output_shown(repo, capsys) -> None:
    # a stand-in proof test: the script runs pytest -s over it (slow ones too) and reads its PROOF line
    (repo / "docs" / "seg.md").unlink()  # a block with no results yet stops update_readme ("run it first")
    line = report("super_resolution", "slm", 1, "dB", 0.5, 0.3)
    (repo / "test_fake_proof.py").write_text(
        f"import pytest\n\n\n@pytest.mark.slow\ndef test_it():\n    print({line!r})\n"
    )
    assert proof_tables.main(["test_fake_proof.py", "--log", str(repo / "run.log")]) == 0
    assert "| `slm` | dB | — | 0.50 |" in (repo / "benchmarks" / "results" / "proofs.md").read_text()
    assert "1 passed" in (repo / "run.log").read_text()
    capsys.readouterr()  # the echoed output stays here, not on a proof run's stdout


def test_a_setting_that_changed_between_seeds_shows_each_value() -> None:
    by_seed = {1: {"bar": 18.0, "margin": None}, 0: {"bar": 30.0, "margin": None}}
    assert proof_tables.distinct(by_seed, "bar") == "30 / 18"  # seed order
    assert proof_tables.distinct(by_seed, "margin") == "—"
