"""Memory bench rows for segmentation (DeepLabV3) and super-resolution (EDSR): the per-block fit in
batch and pixels, the paper-cell configs each row is built from, and tiny real runs."""

import csv
from types import SimpleNamespace

import pytest

from locallearn.bench import memory_dense
from locallearn.bench.memory_dense import paper_config, pixel_fit, predict, run_pixels
from locallearn.cli import main as cli_main


def read_rows(path):
    with open(path, newline="") as f:
        return {r["method"]: r for r in csv.DictReader(f)}


def test_pixel_fit_recovers_an_affine_law_per_block():
    # block 0: 3 bytes/pixel/image + 100/image + 7 fixed; block 1: 5 bytes/pixel/image, nothing else
    laws = [(3.0, 100.0, 7.0), (5.0, 0.0, 0.0)]
    points = {(n, s): predict(laws, n, s) for n in (2, 3) for s in (8, 12)}
    fits = pixel_fit(points, 2, 3, 8, 12)
    for got, want in zip(fits, laws):
        assert got == pytest.approx(want)
    assert predict(fits, 16, 768) == pytest.approx(predict(laws, 16, 768))


def test_rows_are_built_from_the_paper_cell_configs():
    path, data, _ = paper_config("segmentation", "resnet101_d8", "infopro+manpp")
    assert path.name == "deeplabv3_r101_infopro_manpp_k2.yaml"
    assert data["model"]["cuts"] == [5] and data["method"]["momentum"] == {"momentum": 0.995}
    path, data, _ = paper_config("segmentation", "resnet50_d8", "dgl+manpp")
    assert path.name == "deeplabv3_r50_infopro_k2.yaml"  # the same K=2 cut, InfoPro's options dropped
    assert data["method"] == {"name": "dgl+manpp"}
    path, data, overrides = paper_config("super_resolution", "edsr", "slm+manpp", scale=3)
    assert path.name == "edsr_x2_man.yaml" and data["method"]["slm"]["bank"] is True
    assert "task.super_resolution.scale=3" in overrides
    with pytest.raises(ValueError, match="no EDSR config"):
        paper_config("super_resolution", "edsr", "infopro")


def check_rows(rows, local):
    assert list(rows)[0] == "bp"
    bp = rows["bp"]
    assert float(bp["ratio_to_bp"]) == 1.0 and bp["K"] == "1" and bp["cuts"] == "-"
    for row in rows.values():
        assert float(row["peak_MiB_at_target"]) > 0 and float(row["per_image_MiB"]) > 0
        # the bytes of these nets are exactly affine in batch and pixels: the fit reproduces real steps
        assert float(row["fit_error_pct"]) < 0.5 and float(row["full_size_error_pct"]) < 0.5
        # 16 images cost more than 16 x one image's share only by the per-step bytes
        assert float(row["peak_MiB_at_target"]) >= 15.9 * float(row["per_image_MiB"])
    assert float(rows[local]["ratio_to_bp"]) < 1.0, rows[local]


def test_segmentation_rows_tiny(tmp_path):
    # DeepLabV3-R50 (dilated, output stride 8) at a 32 px crop: every map scales with the pixels, so the
    # ratio is the one at 768; InfoPro K=2 (MAN++ Table VI) holds less than E2E
    text = run_pixels(
        "segmentation", "resnet50_d8", ["infopro"], size=32, fit_sizes=(16, 24), out_dir=tmp_path, name="seg"
    )
    rows = read_rows(tmp_path / "seg.csv")
    assert list(rows) == ["bp", "infopro"]
    assert rows["infopro"]["K"] == "2" and rows["infopro"]["cuts"] == "5"  # the MAN++ K=2 cut
    assert rows["infopro"]["config"] == "deeplabv3_r50_infopro_k2.yaml"
    assert len(rows["infopro"]["blocks_MiB"].split(" / ")) == 2
    check_rows(rows, "infopro")
    assert "DeepLabV3-resnet50_d8 at crop 32x32" in text and "| infopro | 2 | 5 |" in text


def test_super_resolution_rows_tiny_via_cli(tmp_path, capsys):
    argv = "bench memory --task super_resolution --backbone edsr_tiny --size 12 --fit-sizes 6 8 --methods slm dgl"
    cli_main([*argv.split(), "--out", str(tmp_path)])
    assert "x2 on 12x12 LR patches (24x24 HR)" in capsys.readouterr().out
    rows = read_rows(tmp_path / "memory_super_resolution_edsr_tiny_x2_12.csv")
    assert list(rows) == ["bp", "slm", "dgl"]
    assert rows["slm"]["K"] == "4" and rows["slm"]["config"] == "edsr_x2_man.yaml"
    # MAN (SLM aux + the LR image from the bank) holds less than bp: the paper's "51% less memory"
    check_rows(rows, "slm")


def test_no_full_check_leaves_the_columns_out(tmp_path):
    run_pixels("super_resolution", "edsr_tiny", [], 8, fit_sizes=(4, 6), full_check=False, out_dir=tmp_path)
    path = tmp_path / "memory_super_resolution_edsr_tiny_x2_8.csv"
    header = path.read_text().splitlines()[0].split(",")
    assert "full_size_MiB" not in header and header[:2] == ["method", "K"]
    assert memory_dense.PIXEL_TASKS["super_resolution"][:2] == ("edsr", 48)


# ------------------------------------------------------------------ detection


def test_detection_rows_are_built_from_table_iv_configs():
    file, data, overrides = memory_dense.detection_config(
        "resnet50", "dgl+manpp[momentum.recompute=true]", True
    )
    assert file == "manpp_coco_retinanet_resnet50_k4_dgl_manpp.yaml"
    assert data["method"]["name"] == "dgl+manpp" and data["method"]["dgl"]["dense_head"] == "manpp"
    assert "method.momentum.recompute=true" in overrides
    _, data, overrides = memory_dense.detection_config("resnet50", "dgl+manpp[dgl.dense_head=fpn]", True)
    assert "method.dgl.dense_head=fpn" in overrides  # our local-FPN aux, as a variant of the cell
    file, data, _ = memory_dense.detection_config("resnet50", "slm", True)
    assert data["method"] == {"name": "slm"}  # the file's dgl options do not apply to slm
    assert (
        memory_dense.detection_config("resnet50", "bp", True)[0] == "manpp_coco_retinanet_resnet50_e2e.yaml"
    )
    assert memory_dense.detection_config("resnet50", "dgl", False)[0] == "-"  # by units: defaults


class _FakeModel:
    def __init__(self, k: int) -> None:
        self.num_blocks, self.cuts = k, list(range(1, k))

    def parameter_counts(self):
        return {"backbone": 1e6, "aux": 2e6}


def test_detection_rows_fit_and_print_every_block(tmp_path, monkeypatch):
    # bytes per block = a * batch + c; the peak block at batch 16 is block 2, although block 0 is larger at batch 1
    laws = {"bp": [(100, 50)], "dgl": [(10, 300), (20, 40), (30, 0)]}
    monkeypatch.setattr(
        memory_dense, "build", lambda b, m, *a, **k: (_FakeModel(len(laws[m])), None, "x.yaml")
    )
    calls = iter(["bp"] * 3 + ["dgl"] * 3)
    monkeypatch.setattr(
        memory_dense, "measure", lambda model, opts, batch: [a * len(batch) + c for a, c in laws[next(calls)]]
    )
    # the whole step: the largest block's bytes on top of 1000 resident bytes (the account itself is tested
    # in tests/metrics/test_step_memory.py)
    monkeypatch.setattr(
        memory_dense,
        "whole_step",
        lambda model, opts, at, *a, **k: SimpleNamespace(
            peak_total_bytes=1000 + max(at), resident_bytes=1000
        ),
    )
    text = memory_dense.run("resnet50", ["dgl"], 64, out_dir=tmp_path, name="det")
    rows = read_rows(tmp_path / "det.csv")
    assert float(rows["dgl"]["total_ratio_to_bp"]) == pytest.approx(1480 / 2650)
    assert rows["dgl"]["peak_block"] == "2" and rows["dgl"]["K"] == "3"
    mib = 2**20
    assert float(rows["dgl"]["peak_MiB_at_target"]) == pytest.approx(480 / mib)
    assert float(rows["dgl"]["ratio_to_bp"]) == pytest.approx(480 / 1650)
    assert rows["dgl"]["blocks_MiB"] == " / ".join(f"{v / mib:.0f}" for v in (460, 360, 480))
    assert float(rows["dgl"]["fit_error_pct"]) == 0.0 and rows["dgl"]["config"] == "x.yaml"
    assert "blocks_MiB" in text and "| dgl | 3 |" in text


@pytest.mark.slow
def test_detection_rows_tiny_real(tmp_path):
    # ResNet-18 at 64 px, K=4 by stages: the official MAN++ aux holds less than our local-FPN aux
    methods = ["dgl+manpp", "dgl+manpp[dgl.dense_head=fpn]"]
    memory_dense.run("resnet18", methods, 64, out_dir=tmp_path, name="det")
    rows = read_rows(tmp_path / "det.csv")
    assert rows["dgl+manpp"]["cuts"] == "3 5 7" and len(rows["dgl+manpp"]["blocks_MiB"].split(" / ")) == 4
    official, ours = (float(rows[m]["peak_MiB_at_target"]) for m in methods)
    assert official < ours
