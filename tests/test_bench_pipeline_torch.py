"""``bench pipeline --baseline torch``: the torch pipelining baseline computes backprop exactly, and
the CLI writes its tables. Each test starts 2 gloo ranks on its own free port."""

from __future__ import annotations

import pytest
import torch

from locallearn.bench.common import build_cell, read_csv, synthetic_batch
from locallearn.bench.pipeline import TORCH_COLUMNS as COLUMNS
from locallearn.bench.pipeline_torch import spawn, stage_blocks, torch_rank
from locallearn.cli import main


def reference(backbone: str, k: int, method: str, batch: int, micro: int) -> tuple[list[float], dict]:
    """Single-process ``bp`` on the ranks' weights: the micro-batches' mean loss, one backward."""
    torch.manual_seed(0)
    staged = build_cell(backbone, k, method).model  # the weights every rank builds
    bp = build_cell(backbone, 1, "bp").model
    bp.backbone.load_state_dict(staged.backbone.state_dict())
    bp.head.load_state_dict(staged.head.state_dict())
    data = synthetic_batch(batch)
    losses = []
    for x, y in zip(data.x.chunk(micro), data.y.chunk(micro)):
        part = type(data)(x, y, data.mean, data.std)
        losses.append(bp.auxes[0](bp.body(0)(x), part)["loss"])
    (sum(losses) / micro).backward()
    grads = {f"backbone.{n}": p.grad for n, p in bp.backbone.named_parameters()}
    grads.update({f"head.{n}": p.grad for n, p in bp.head.named_parameters()})
    return [float(v.detach()) for v in losses], grads


@pytest.mark.parametrize(
    "schedule, k, sizes",
    [
        ("1f1b", 2, [1, 1]),
        pytest.param("gpipe", 4, [1, 3], marks=pytest.mark.slow),
        pytest.param("interleaved1f1b", 4, [2, 2], marks=pytest.mark.slow),
        pytest.param("interleavedzb", 4, [2, 2], marks=pytest.mark.slow),
    ],
)
def test_torch_pipelining_baseline_is_single_process_bp(schedule, k, sizes):
    spec = dict(backbone="resnet20", k=k, method="dgl", batch=8, micro=2, steps=1, warmup=0, sizes=sizes,
                schedule=schedule, grads=True)  # fmt: skip
    ranks = spawn(torch_rank, 2, spec)
    losses, grads = reference("resnet20", k, "dgl", 8, 2)
    got = {**ranks[0]["grads"], **ranks[1]["grads"]}
    assert set(got) == set(grads)  # every backbone and head parameter got its gradient on one rank
    assert ranks[1]["losses"] == pytest.approx(losses, rel=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(torch.from_numpy(got[name]), g, rtol=1e-4, atol=1e-6, msg=name)


def test_interleaved_needs_two_blocks_per_rank():
    assert stage_blocks([1, 3], 4, 2, interleaved=False) == [[0], [1, 2, 3]]
    assert stage_blocks([2, 2], 4, 2, interleaved=True) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="K=2 blocks on P=2 ranks"):
        stage_blocks([1, 1], 2, 2, interleaved=True)


@pytest.mark.slow
def test_cli_baseline_torch_writes_tables(tmp_path):
    main(
        ["bench", "pipeline", "--baseline", "torch", "--backbone", "resnet20", "--num-blocks", "4"]
        + ["--batch", "4", "--micro-batches", "2", "--steps", "1", "--warmup", "1", "--balance", "memory"]
        + ["--out", str(tmp_path)]
    )
    rows = read_csv(tmp_path / "pipeline_torch.csv")
    assert list(rows[0]) == COLUMNS
    assert [r["schedule"] for r in rows] == [
        "-",
        "sequential",
        "gpipe",
        "1f1b",
        "interleaved1f1b",
        "interleavedzb",
        "depth 2, no drain",
    ]
    for r in rows:
        assert float(r["images_per_s"]) > 0 and float(r["act_mib"]) > 0 and float(r["resident_mib"]) > 0
    md = (tmp_path / "pipeline_torch.md").read_text()
    assert "micro-batches of 2" in md and "| bp, torch ScheduleGPipe | gpipe | 2 |" in md


def test_cli_refuses_ranks_beyond_blocks(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "pipeline", "--baseline", "torch", "--num-blocks", "2", "--ranks", "3"])
    assert e.value.code != 0 and "--ranks must be between 2 and --num-blocks (2)" in capsys.readouterr().err


def test_resident_bytes_counts_the_largest_gradient_group_once():
    from torch import nn

    from locallearn.bench.pipeline_torch import resident_bytes

    a, b = nn.Linear(4, 4), nn.Linear(4, 2)  # 20 and 10 parameters, 4 bytes each
    params = [*a.parameters(), *b.parameters()]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sum(m(torch.ones(1, 4)).sum() for m in (a, b)).backward()
    opt.step()  # momentum buffers: one per parameter
    assert resident_bytes(params, [list(a.parameters()), list(b.parameters())], [opt]) == 4 * (30 + 20 + 30)
    assert resident_bytes(params, [params], [opt]) == 4 * (30 + 30 + 30)
