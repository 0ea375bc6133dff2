"""engine.mode=ddp: per-block all-reduce equals single-process training on the concatenated batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import RandomBatches, launch, run_function, tiny_config
from torch import nn

from locallearn.backbones.base import Backbone
from locallearn.engine import ddp
from locallearn.engine.sequential import train_epoch
from locallearn.model import LocalModel
from locallearn.types import Batch, FeatureInfo


class Aux(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.head = nn.Linear(channels, 10)

    def forward(self, h, batch):
        return {"loss": F.cross_entropy(self.head(h.mean((2, 3))), batch.y)}


def bn_free_model() -> LocalModel:
    """Two blocks of conv + ReLU, no batch statistics: DDP must equal the concatenated batch."""
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU()) for _ in range(1)]
    layers += [nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.Tanh()) for _ in range(2)]
    info = [FeatureInfo(6, 1)] * 3
    return LocalModel(Backbone(layers, info, 1), [1], [Aux(6), Aux(6)])


def Batches():  # noqa: N802 (stands where the class stood)
    """Four global batches of 10 random 8x8 images (uneven shards for 3 ranks: 3/3/4)."""
    return RandomBatches(4, 10)


class NoSchedule:
    lr = 0.1

    def step(self):
        pass


def optimizers(model):
    return [torch.optim.SGD(model.block_parameters(k), lr=0.1, momentum=0.9) for k in range(model.num_blocks)]


def _ddp_train(ctx, out: str) -> None:
    model = bn_free_model()
    share = ddp.Share()
    opts = [ddp.GradAllReduce(o, ctx, share) for o in optimizers(model)]
    train_epoch(model, ddp.Shards(Batches(), ctx, share, model), opts, NoSchedule(), ctx.device)
    torch.save(model.state_dict(), Path(out, f"ddp.rank{ctx.rank}.pt"))


def test_ddp_equals_single_process_on_the_concatenated_batch(tmp_path):
    run_function(3, _ddp_train, str(tmp_path))
    model = bn_free_model()
    train_epoch(model, Batches(), optimizers(model), NoSchedule(), torch.device("cpu"))
    reference = model.state_dict()
    ranks = [torch.load(tmp_path / f"ddp.rank{r}.pt") for r in range(3)]
    for key, value in reference.items():
        assert not torch.equal(value, bn_free_model().state_dict()[key])  # it trained
        for state in ranks:
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)
            assert torch.equal(state[key], ranks[0][key])  # ranks stay identical


def test_ddp_run_keeps_ranks_identical_and_resumes(tmp_path):
    """resnet20 + InfoPro through the CLI's run: BN statistics averaged, so both ranks hold the same
    weights and buffers; rank 0's checkpoint.pt resumes both ranks."""
    cfg = tiny_config(tmp_path / "ddp", mode="ddp", measure_memory=True)
    launch(2, tmp_path, cfg, stop_after=1)
    launch(2, tmp_path, resume=tmp_path / "ddp" / "run")
    a, b = (torch.load(tmp_path / f"state.rank{r}.pt") for r in range(2))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    memory = json.loads((tmp_path / "ddp" / "run" / "summary.json").read_text())["memory"]
    # the whole step with each block's flat all-reduce copy of its gradients
    assert memory["memory_mode"] == "ddp" and memory["peak_total_bytes"] > memory["parameter_bytes"]


@pytest.mark.slow
def test_ddp_run_with_compiled_blocks_equals_uncompiled(tmp_path):
    """engine.compile under DDP: each rank compiles its own blocks; with the eager backend (no generated
    code) the trained weights equal an uncompiled DDP run bitwise."""
    states = []
    for name, extra in (("eager", {}), ("compiled", {"compile": True, "compile_backend": "eager"})):
        out = tmp_path / name
        out.mkdir()
        launch(2, out, tiny_config(out / "runs", mode="ddp", **extra), stop_after=1)
        states.append([torch.load(out / f"state.rank{r}.pt") for r in range(2)])
    (a0, a1), (b0, b1) = states
    for key in a0:
        assert torch.equal(a0[key], a1[key]) and torch.equal(b0[key], b1[key]), key
        assert torch.equal(a0[key], b0[key]), key


# ------------------------------------------------------------------------------ exact test metrics
# ddp.evaluate feeds each rank's shards to the task's evaluator and merges the gathered states; the
# metrics must equal one evaluator over the whole test set. The "models" below compute each image's
# output from that image alone with element-wise ops, so outputs are bitwise the same whatever the
# shard size and any difference comes from the merge.


class Pointwise(nn.Module):
    """Output = ``fn(x)``, image by image; takes the bank as LocalModel does."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x, bank=None):
        return self.fn(x)


def _cls_logits(x):
    return x.flatten(1)[:, :10] * 3


def _seg_logits(x):
    return x[:, :, ::2, ::2] * 3  # logits at stride 2: the task upsamples them to the label map


def _sr_output(x):
    return F.interpolate(x, scale_factor=2, mode="nearest")


class EvalBatches:
    """Three batches of 5 (shards of 2 / 3 on two ranks) for classification, segmentation or SR."""

    data = range(15)
    batch_size = 5

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __iter__(self):
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            if self.kind == "classification":
                x = torch.randn(5, 1, 4, 4, generator=gen)
                y = torch.randint(0, 10, (5,), generator=gen)
            elif self.kind == "segmentation":
                x = torch.randn(5, 4, 8, 8, generator=gen)
                pred = F.interpolate(_seg_logits(x), size=(16, 16), mode="bilinear").argmax(1)
                right = torch.tensor([0.1, 0.2, 0.9, 0.9, 0.8])[:, None, None]  # rank 1's shard: mostly right
                hit = torch.rand(5, 16, 16, generator=gen) < right
                y = torch.where(hit, pred, torch.randint(0, 4, (5, 16, 16), generator=gen))
                y[:, :2] = 255  # an ignored border
            else:
                x = torch.rand(5, 3, 16, 16, generator=gen)
                y = (_sr_output(x) + 0.1 * torch.randn(5, 3, 32, 32, generator=gen)).clamp(0, 1)
            yield Batch(x, y)

    def __len__(self):
        return 3


def eval_setup(kind: str):
    from locallearn.tasks.classification import Classification
    from locallearn.tasks.segmentation import Segmentation
    from locallearn.tasks.super_resolution import SuperResolution

    if kind == "classification":
        return Pointwise(_cls_logits), Classification(10)
    if kind == "segmentation":
        return Pointwise(_seg_logits), Segmentation(4)
    return Pointwise(_sr_output), SuperResolution(3)


def _ddp_eval(ctx, kind: str, out: str) -> None:
    model, task = eval_setup(kind)
    metrics = ddp.evaluate(model, ddp.Shards(EvalBatches(kind), ctx), task, ctx)
    torch.save(metrics, Path(out, f"metrics.rank{ctx.rank}.pt"))


def ddp_metrics(kind: str, tmp_path: Path) -> list[dict]:
    run_function(2, _ddp_eval, kind, str(tmp_path))
    return [torch.load(tmp_path / f"metrics.rank{r}.pt") for r in range(2)]


def single_process(kind: str, batches=None) -> dict:
    from locallearn.engine.sequential import evaluate

    model, task = eval_setup(kind)
    return evaluate(model, batches or EvalBatches(kind), task, torch.device("cpu"))


def per_rank_mean(kind: str, key: str) -> float:
    """What averaging each rank's own metric would give (the wrong answer for mIoU / AP)."""

    class Ctx:
        def __init__(self, rank):
            self.rank, self.world = rank, 2

    return sum(single_process(kind, ddp.Shards(EvalBatches(kind), Ctx(r)))[key] for r in range(2)) / 2


def test_ddp_classification_metrics_equal_single_process(tmp_path):
    reference = single_process("classification")
    for metrics in ddp_metrics("classification", tmp_path):
        assert metrics.keys() == reference.keys() == {"top1", "top5", "loss"}
        assert metrics["top1"] == reference["top1"] and metrics["top5"] == reference["top5"]
        assert metrics["loss"] == pytest.approx(reference["loss"], rel=1e-6)


def test_ddp_segmentation_miou_from_one_merged_confusion_matrix(tmp_path):
    reference = single_process("segmentation")
    assert abs(per_rank_mean("segmentation", "miou") - reference["miou"]) > 0.1  # the test can fail
    for metrics in ddp_metrics("segmentation", tmp_path):
        assert metrics.keys() == reference.keys() == {"pixel_acc", "mean_acc", "miou", "loss"}
        for key in ("pixel_acc", "mean_acc", "miou"):  # integer counts: exact
            assert metrics[key] == reference[key], key
        assert metrics["loss"] == pytest.approx(reference["loss"], rel=1e-6)


def test_ddp_super_resolution_psnr_ssim_are_means_over_all_images(tmp_path):
    reference = single_process("super_resolution")
    for metrics in ddp_metrics("super_resolution", tmp_path):
        assert metrics.keys() == reference.keys() == {"psnr", "ssim", "psnr_rgb", "loss"}
        for key in reference:
            assert metrics[key] == pytest.approx(reference[key], rel=1e-6 if key == "loss" else 1e-12), key


class StubDetection:
    """Detection's real evaluator (COCOeval over the bound split) on fixed detections: each target's
    boxes shifted by an image-dependent amount, with a confident false positive on every image."""

    def __init__(self, data) -> None:
        self.eval_data = data

    def evaluator(self):
        from locallearn.tasks.detection import DetectionEvaluator

        return DetectionEvaluator(self)

    def loss(self, output, batch):
        return torch.tensor(0.5)

    def detect(self, output, batch):
        out = []
        for t in batch.targets:
            shift = 4.0 * int(t["image_id"]) * t["scale"]
            boxes = t["boxes"] + torch.tensor([shift, 0.0, shift, 0.0])
            fp = torch.tensor([[0.0, 0.0, 10.0, 10.0]]) * t["scale"]
            out.append(
                {
                    "boxes": torch.cat([fp, boxes]),
                    "scores": torch.cat([torch.tensor([0.99]), torch.linspace(0.9, 0.5, len(boxes))]),
                    "labels": torch.cat([torch.tensor([0]), t["labels"]]),
                }
            )
        return out


def detection_setup(root: str):
    from locallearn.data.detection import DetectionLoader, read_coco

    data = read_coco(root, "val")
    return (
        Pointwise(torch.clone),
        StubDetection(data),
        DetectionLoader(data, 3, False, min_size=64, max_size=96),
    )


def _ddp_detection_eval(ctx, root: str, out: str) -> None:
    model, task, loader = detection_setup(root)
    metrics = ddp.evaluate(model, ddp.Shards(loader, ctx), task, ctx)
    torch.save(metrics, Path(out, f"metrics.rank{ctx.rank}.pt"))


def test_ddp_detection_runs_one_cocoeval_over_every_rank_detections(tmp_path):
    import numpy as np

    from locallearn.data.detection import write_fixture
    from locallearn.engine.sequential import evaluate

    images = [np.zeros((60 + 10 * i, 80, 3), np.uint8) for i in range(4)]  # 4 images: 1 / 3 per rank
    anns = [
        [{"box": (4 + i, 6, 40, 44 + i), "label": i % 2}, {"box": (45, 10, 78, 50), "label": 1}]
        for i in range(4)
    ]
    write_fixture(tmp_path / "coco", "coco", images, anns, ("a", "b"))
    model, task, loader = detection_setup(str(tmp_path / "coco"))
    reference = evaluate(model, loader, task, torch.device("cpu"))
    assert 0 < reference["AP"] < 100
    run_function(2, _ddp_detection_eval, str(tmp_path / "coco"), str(tmp_path))
    for r in range(2):
        metrics = torch.load(tmp_path / f"metrics.rank{r}.pt")
        assert metrics.keys() == reference.keys()
        for key, value in reference.items():
            assert metrics[key] == pytest.approx(value, nan_ok=True), key


# every block is scored under ddp too: each block's evaluator is merged over the ranks as the head's is


def _block_model():
    from tests.methods.methods_util import tiny_model

    model, _, _ = tiny_model("dgl", k=3, seed=5)
    return model


def _ddp_block_eval(ctx, out: str) -> None:
    from locallearn.tasks.classification import Classification

    metrics = ddp.evaluate(_block_model(), ddp.Shards(BlockBatches(), ctx), Classification(10), ctx)
    torch.save(metrics, Path(out, f"metrics.rank{ctx.rank}.pt"))


class BlockBatches(EvalBatches):
    def __init__(self) -> None:
        super().__init__("classification")

    def __iter__(self):
        gen = torch.Generator().manual_seed(4)
        for _ in range(3):
            yield Batch(torch.randn(5, 3, 8, 8, generator=gen), torch.randint(0, 10, (5,), generator=gen))


def test_ddp_scores_every_block_as_single_process(tmp_path):
    from locallearn.engine.sequential import evaluate
    from locallearn.tasks.classification import Classification

    reference = evaluate(_block_model(), BlockBatches(), Classification(10), torch.device("cpu"))
    assert {f"block{k}_top1" for k in range(3)} <= reference.keys()
    run_function(2, _ddp_block_eval, str(tmp_path))
    for r in range(2):
        metrics = torch.load(tmp_path / f"metrics.rank{r}.pt")
        assert metrics.keys() == reference.keys()
        for k in range(3):
            assert metrics[f"block{k}_top1"] == reference[f"block{k}_top1"], k
