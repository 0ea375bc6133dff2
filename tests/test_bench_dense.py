"""Memory bench rows for segmentation (DeepLabV3) and super-resolution (EDSR): the per-block fit in
batch and pixels, the paper-cell configs each row is built from, and tiny real runs."""

import csv

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
