"""Every detection config maps to the paper-table cells it reproduces, one config per cell; the
memory-augmented MAN's Table 4 ablation has exactly its three rows, each config meaning what its row says."""

from pathlib import Path

from locallearn.config import load_config

CONFIGS = Path(__file__).parents[2] / "configs" / "detection"
MAN, MANPP = "memory-augmented MAN", "MAN++ TPAMI"

# file -> the (paper, table, row) cells it is; () = not a paper cell (runs on the bundled photo)
CELLS: dict[str, tuple[tuple[str, str, str], ...]] = {
    # Table 4 (RetinaNet-R34 on COCO, K=16): Adapt = SLM + feature bank, Head = the shared main head.
    # Its rows: (x, x) 28.7 mAP 10.32 GB, (v, x) 27.7 / 8.07, (v, v) 28.5 / 8.19; the text's "MAN saves
    # 20.6% of DGL's memory" = 1 - 8.19 / 10.32 makes (x, x) the DGL baseline of Table 3.
    "man_coco_retinanet_resnet34_k16_dgl.yaml": (
        (MAN, "Table 3", "RetinaNet-R34 DGL"),
        (MAN, "Table 4", "Adapt x, Head x"),
    ),
    "man_coco_retinanet_resnet34_k16_slm.yaml": (
        (MAN, "Table 3", "RetinaNet-R34 MAN"),
        (MAN, "Table 4", "Adapt v, Head v"),
    ),
    "man_coco_retinanet_resnet34_k16_slm_noshare.yaml": ((MAN, "Table 4", "Adapt v, Head x"),),
    "man_coco_yolo_resnet34_bp.yaml": ((MAN, "Table 3", "YOLO-R34 BP"),),
    "man_coco_yolo_resnet34_k16_slm.yaml": ((MAN, "Table 3", "YOLO-R34 MAN"),),
    "man_coco_yolo_resnet101_bp.yaml": ((MAN, "Table 3", "YOLO-R101 BP"),),
    "man_coco_yolo_resnet101_k33_slm.yaml": ((MAN, "Table 3", "YOLO-R101 MAN"),),
    **{
        f"man_voc_retinanet_resnet{d}_{cell}.yaml": ((MAN, "Table 2", f"RetinaNet-R{d} {row}"),)
        for d, k in (("34", 16), ("50", 16), ("101", 33), ("152", 50))
        for cell, row in (("bp", "BP"), (f"k{k}_slm", "MAN"))
    },
    **{
        f"manpp_coco_retinanet_resnet{d}_{cell}.yaml": ((MANPP, "Table IV", f"RetinaNet-R{d} {row}"),)
        for d in ("18", "34", "50", "101", "152")
        for cell, row in (("e2e", "E2E"), ("k4_dgl_manpp", "DGL+MAN++"))
    },
    "overfit_voc_sample_r18_bp.yaml": (),
    "smoke_voc_sample_r18_slm.yaml": (),
    "digit_scenes_r18_dgl.yaml": (),  # held-out digits, not a paper cell (docs/detection.md)
}
TABLE_4_ROWS = {"Adapt x, Head x", "Adapt v, Head x", "Adapt v, Head v"}  # the table has no (x, v) row


def header(path: Path) -> str:
    return "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))


def test_every_config_is_mapped_and_every_cell_has_one_config():
    assert sorted(CELLS) == sorted(p.name for p in CONFIGS.glob("*.yaml"))
    cells = [cell for file_cells in CELLS.values() for cell in file_cells]
    assert len(cells) == len(set(cells))
    for name, file_cells in CELLS.items():
        text = header(CONFIGS / name)
        for paper, table, _ in file_cells:  # the header names its tables
            assert (("MAN++" in text) == (paper == MANPP)) and f"{table}" in text, (name, table)


def test_table_4_rows_exactly():
    rows = {row: name for name, cells in CELLS.items() for _, table, row in cells if table == "Table 4"}
    assert set(rows) == TABLE_4_ROWS
    for row, name in rows.items():
        path = CONFIGS / name
        assert f"Table 4 ({row})" in header(path), name  # labelled with its row, and only that one
        assert all(f"Table 4 ({r})" not in header(path) for r in TABLE_4_ROWS - {row})
        cfg = load_config(path, [])
        assert (cfg.model.backbone, cfg.model.num_blocks, cfg.data.name) == ("resnet34", 16, "coco")
        adapt, head = (part.split()[1] == "v" for part in row.split(", "))
        slm = cfg.method.options.get("slm", {})
        # Adapt: the SLM aux with the feature bank; without it, the traditional local aux (DGL)
        assert cfg.method.name == ("slm" if adapt else "dgl"), name
        assert slm.get("bank", False) == adapt and slm.get("share_head", False) == head, name
    for path in CONFIGS.glob("*.yaml"):  # no config claims a row the table lacks
        assert "Table 4 (Adapt x, Head v)" not in header(path) and "Adapt off" not in header(path)
