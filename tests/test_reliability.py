"""Issue 14: no silent NaN, no poisoned model from a 1-image batch, `1e-3` floats, and one clear line
(non-zero exit) for the bad inputs that used to end in a traceback."""

import errno
import json
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from locallearn.config import ConfigError, config_warnings, load_config, load_yaml
from locallearn.data import DataError, load_datasets
from locallearn.data.loader import ArrayDataset, Loader
from locallearn.engine import checkpoint, ddp
from locallearn.engine.errors import DivergedError, NonFiniteLossError, check_finite
from locallearn.run import Run
from locallearn.run.launch import resume_run
from tests import helpers

TINY = [*helpers.TINY_CLI, "engine.measure_memory=false"]


def run_cli(args, capsys):
    return helpers.run_cli(args, capsys, lines=True)


one_error_line = helpers.one_error_line


# -- 1. non-finite losses ----------------------------------------------------------------------------
def test_check_finite_names_block_and_step():
    check_finite(torch.tensor([1.0, 2.0], dtype=torch.float64), 0)
    with pytest.raises(NonFiniteLossError, match="block 3's loss is nan at step 5"):
        check_finite(torch.tensor([1.0, float("nan")], dtype=torch.float64), 4, first_block=2)


def test_nan_stops_the_run_with_one_line_and_no_summary(tmp_path, capsys):
    args = ["train", *TINY, "data.batch_size=8", "optim.lr=1e6", "method.name=dgl", f"out_dir={tmp_path}"]
    code, _, err = run_cli([*args, "name=nan"], capsys)
    line = one_error_line(err, code, 3)
    assert "diverged" in line and "epoch 1" in line
    assert not (tmp_path / "nan" / "summary.json").exists()


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    cfg = load_config(None, [*TINY, "optim.epochs=2", "method.name=dgl", f"out_dir={tmp_path}", "name=r"])
    run = Run(cfg, quiet=True)
    run.fit(stop_after=1)
    saved = (tmp_path / "r" / "checkpoint.pt").read_bytes()
    run.cfg.optim.lr = 1e6  # the schedule reads this: epoch 2 explodes
    with pytest.raises(DivergedError, match="epoch 2"):
        run.fit()
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == saved
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["epochs"] == 1  # not rewritten


# -- 2. a last training batch of one image -----------------------------------------------------------
def tiny_set(n, classes=10):
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)
    return ArrayDataset(images, torch.arange(n) % classes, classes, (0.5,), (0.25,))


def test_loader_drops_a_too_small_last_training_batch_only():
    train = Loader(tiny_set(65), 32, train=True)
    train.min_batch = 2
    assert len(train) == 2 and train.dropped == 1 and [len(b) for b in train] == [32, 32]
    test = Loader(tiny_set(65), 32, train=False)
    test.min_batch = 2
    assert test.dropped == 0 and sum(len(b) for b in test) == 65
    ranks = Loader(tiny_set(66), 32, train=True)
    ranks.min_batch = 4  # ddp, 2 ranks: a last batch of 2 would leave each rank one image
    assert ranks.dropped == 2 and len(ranks) == 2


@pytest.mark.parametrize("method", ["dgl", "dgl+manpp", "infopro"])
def test_one_image_last_batch_trains_without_error_or_nan(tmp_path, capsys, method):
    args = ["train", *TINY, "data.train_subset=65", f"method.name={method}", f"out_dir={tmp_path}", "name=r"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert any("drops the last training batch (1 image" in line for line in err)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["train_images"] == 65 and np.isfinite(summary["final"])
    run = resume_run(tmp_path / "r", quiet=True)
    assert all(torch.isfinite(v).all() for v in run.model.state_dict().values() if v.is_floating_point())


@dataclass
class FakeContext:
    rank: int
    world: int


def test_ddp_evaluation_keeps_every_test_image():
    loader = Loader(tiny_set(65), 32, train=False)
    seen = sum(len(b) for r in range(2) for b in ddp.Shards(loader, FakeContext(r, 2)))
    assert seen == 65  # the last batch of 1 image goes to one rank, not dropped


# -- 3. scientific notation --------------------------------------------------------------------------
def test_scientific_notation_for_floats_on_cli_and_in_yaml(tmp_path):
    cfg = load_config(None, ["optim.lr=1e-3", "optim.betas=[9e-1, 0.999]", "engine.dist_timeout_s=3e2"])
    assert cfg.optim.lr == 0.001 and cfg.optim.betas == [0.9, 0.999] and cfg.engine.dist_timeout_s == 300
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  weight_decay: 5e-4\n  warmup_lr: 1E-2\n")
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_lr) == (0.001, 0.0005, 0.01)
    with pytest.raises(ConfigError, match="expected int"):
        load_config(None, ["optim.epochs=1e3"])  # ints stay ints
    with pytest.raises(ConfigError, match="expected float"):
        load_config(None, ["optim.lr=1e-3x"])


# -- 4. one line instead of a traceback --------------------------------------------------------------
def test_binary_config_file(tmp_path, capsys):
    path = tmp_path / "model.pt"
    path.write_bytes(bytes(range(256)) * 4)
    code, _, err = run_cli(["train", "-c", str(path)], capsys)
    assert "not a text" in one_error_line(err, code)


def write_cifar(root, data=None, labels=None, key="labels"):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {"data": np.zeros((4, 3072), np.uint8) if data is None else data}
        d[key] = [0, 1, 2, 3] if labels is None else labels
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)


@pytest.mark.parametrize(
    "kind,message",
    [
        ("labels>=classes", "labels must lie in 0..9"),
        ("no labels", "needs the keys"),
        ("shape", "must be uint8 N x 3072"),
        ("dtype", "must be uint8 N x 3072"),
        ("label type", "must be integers"),
    ],
)
def test_bad_cifar_pickles(tmp_path, kind, message):
    kwargs = {
        "labels>=classes": {"labels": [0, 1, 2, 10]},
        "no labels": {"key": "fine_labels"},
        "shape": {"data": np.zeros((4, 1024), np.uint8)},
        "dtype": {"data": np.zeros((4, 3072), np.float32)},
        "label type": {"labels": ["a", "b", "c", "d"]},
    }[kind]
    write_cifar(tmp_path, **kwargs)
    with pytest.raises(DataError, match=message):
        load_datasets("cifar10", str(tmp_path))


def test_good_cifar_fixture_reads(tmp_path):
    write_cifar(tmp_path)
    train, test = load_datasets("cifar10", str(tmp_path))
    assert len(train) == 20 and len(test) == 4


def test_stl10_labels_out_of_range(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    for split in ("train", "test"):
        np.zeros(2 * 3 * 96 * 96, np.uint8).tofile(folder / f"{split}_X.bin")
        np.array([1, 11], np.uint8).tofile(folder / f"{split}_y.bin")
    with pytest.raises(DataError, match="labels must lie in 1..10, found 1..11"):
        load_datasets("stl10", str(tmp_path))


def test_missing_data_says_how_to_run_offline(capsys, tmp_path):
    code, _, err = run_cli(["train", "data.name=cifar10", f"data.root={tmp_path}"], capsys)
    assert "data.name=digits" in one_error_line(err, code)


def test_out_dir_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(["train", *TINY, f"out_dir={blocker}"], capsys)
    assert "cannot create the run directory" in one_error_line(err, code)


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    saves = []
    real_save = torch.save

    def save(obj, f, *a, **k):
        saves.append(1)
        if len(saves) == 2:  # the second epoch's checkpoint: the disk is full half-way
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    args = ["train", *TINY, "optim.epochs=2", "method.name=dgl", f"out_dir={tmp_path}", "name=r"]
    code, _, err = run_cli(args, capsys)
    assert "No space left on device" in one_error_line(err, code, 1)
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "r" / "checkpoint.pt")["epoch"] == 1
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    cfg = load_config(None, [*TINY, "method.name=dgl", f"out_dir={out}", "name=r"])
    Run(cfg, quiet=True).fit()
    return out / "r"


def test_eval_of_weights_that_do_not_fit_says_what_differs(finished_run, tmp_path, capsys):
    state = checkpoint.load(finished_run / "checkpoint.pt")
    key = next(k for k in state["model"] if k.endswith("weight") and state["model"][k].dim() == 4)
    state["model"][key] = torch.zeros(2, 2, 1, 1)
    checkpoint.save(tmp_path / "bad.pt", state)
    code, _, err = run_cli(["eval", str(tmp_path / "bad.pt")], capsys)
    line = one_error_line(err, code)
    assert "differ in shape" in line and key in line and "(2, 2, 1, 1)" in line


def test_checkpoint_without_epoch(finished_run, tmp_path, capsys):
    state = checkpoint.load(finished_run / "checkpoint.pt")
    del state["epoch"]
    checkpoint.save(tmp_path / "noepoch.pt", state)
    code, _, err = run_cli(["eval", str(tmp_path / "noepoch.pt")], capsys)
    assert "has no epoch" in one_error_line(err, code)


# -- 5. a pipeline run ends with an ordinary, merged checkpoint -------------------------------------
@pytest.mark.slow  # two ranks, ~15 s on a shared 2-core CPU
def test_pipeline_run_writes_a_merged_checkpoint_that_eval_reads(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent / "engine"))
    from dist_helpers import launch, tiny_config

    from locallearn.run.launch import evaluate_checkpoint

    cfg = tiny_config(tmp_path / "pipe", mode="pipeline", pipeline_blocks=[3, 1])
    cfg.optim.epochs = 1
    launch(2, tmp_path, cfg)
    run_dir = tmp_path / "pipe" / "run"
    merged = checkpoint.load(run_dir / "checkpoint.pt")
    assert merged["merged_from"] == "pipeline" and merged["epoch"] == 1
    ranks = [checkpoint.load(run_dir / f"checkpoint.rank{r}.pt")["model"] for r in range(2)]
    for key, value in merged["model"].items():  # each tensor from the rank that trains it
        owner = (
            ranks[1]
            if key in ranks[1] and not key.startswith(("backbone.layers.0.", "auxes.0."))
            else ranks[0]
        )
        assert torch.equal(value, owner[key]), key
    result = evaluate_checkpoint(run_dir, "cpu")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["top1"] == pytest.approx(summary["final"])
    with pytest.raises(checkpoint.CheckpointError, match="merged copy"):
        resume_run(run_dir / "checkpoint.pt")


# -- 6. issue 22: one line and the documented exit code for what the probe found ---------------------
@pytest.mark.parametrize(
    "override,message",
    [
        ("seed=-1", "seed must lie in 0..4294967295"),
        ("seed=4294967296", "seed must lie in 0..4294967295"),
        ("optim.lr=1e39", "beyond what float32 holds"),
        ("optim.lr=1e-50", "beyond what float32 holds"),
        ("optim.lr=.inf", "expected a finite number"),
        ("optim.weight_decay=.nan", "expected a finite number"),
        ("optim.lr=1e400", "expected a finite number"),
        ("data.batch_size=99999999999999999999", "does not fit a 64-bit integer"),
        ("optim.epochs=1000000000", "cannot finish"),
    ],
)
def test_numbers_the_run_cannot_use_are_refused_at_config_time(tmp_path, capsys, override, message):
    code, _, err = run_cli(["train", *TINY, override, f"out_dir={tmp_path}"], capsys)
    assert message in one_error_line(err, code)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../../x", "a/b", "", ".", "..", "/abs"])
def test_a_run_name_is_one_path_component(tmp_path, capsys, name):
    out = tmp_path / "deep" / "out"
    code, _, err = run_cli(["train", *TINY, f"out_dir={out}", f"name={name}"], capsys)
    assert "one directory name inside out_dir" in one_error_line(err, code)
    assert list(tmp_path.iterdir()) == []  # nothing created, inside out_dir or outside it


def test_a_key_twice_in_a_yaml_file_is_refused_naming_it(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    code, _, err = run_cli(["train", "-c", str(path)], capsys)
    line = one_error_line(err, code)
    assert "'lr' twice" in line and "lines 2 and 4" in line and str(path) in line
    merged = tmp_path / "merge.yaml"  # a YAML merge key the mapping overrides is not a duplicate
    merged.write_text("base: &b {lr: 0.1, epochs: 3}\noptim:\n  <<: *b\n  lr: 0.2\n")
    assert load_config(None, [], base={"optim": load_yaml(merged)["optim"]}).optim.lr == 0.2


def test_values_that_change_the_run_are_named(tmp_path):
    cfg = load_config(None, ["optim.epochs=2", "optim.warmup_epochs=5", "data.train_subset=4"])
    warnings = config_warnings(cfg, train_images=1797, num_classes=10)
    assert any("optim.warmup_epochs=5 is more than optim.epochs=2" in w for w in warnings)
    assert any("data.train_subset=4 is fewer than the 10 classes" in w for w in warnings)
    assert any("data.batch_size=1024 is more than the 4 training images" in w for w in warnings)
    cfg = load_config(None, ["data.train_subset=5000", "data.batch_size=64", "optim.warmup_epochs=1"])
    (warning,) = config_warnings(cfg, train_images=1797, num_classes=10)
    assert "data.train_subset=5000 is more than the 1797 training images" in warning
    ok = load_config(None, ["data.train_subset=64", "data.batch_size=32", "optim.warmup_epochs=1"])
    assert config_warnings(ok, train_images=1797, num_classes=10) == []
    constant = load_config(None, ["optim.schedule=constant", "optim.warmup_epochs=2", "optim.epochs=4"])
    (warning,) = config_warnings(constant, train_images=1797, num_classes=10)
    assert "optim.warmup_epochs=2 is ignored: the constant schedule has no warm-up" in warning


def disk_full_in_torch(obj, f, *args, **kwargs):
    """What torch.save does when the disk fills: the file's OSError, then its zip writer's
    RuntimeError while closing (the OSError as its context)."""
    f.write(b"partial")
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662") from None


def test_full_disk_inside_torch_s_zip_writer_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    real_save, saves = torch.save, []

    def save(obj, f, *a, **k):
        saves.append(1)
        if len(saves) == 2:
            disk_full_in_torch(obj, f)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    args = ["train", *TINY, "optim.epochs=2", "method.name=dgl", f"out_dir={tmp_path}", "name=r"]
    code, _, err = run_cli(args, capsys)
    line = one_error_line(err, code, 1)
    assert "No space left on device" in line and str(tmp_path / "r" / "checkpoint.pt") in line, line
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "r" / "checkpoint.pt")["epoch"] == 1  # the previous one is intact
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.endswith(".tmp")]
    # torch's RuntimeError alone (no OSError to read): still a write error naming the file
    monkeypatch.setattr(
        torch, "save", lambda *a: (_ for _ in ()).throw(RuntimeError("unexpected pos 1 vs 0"))
    )
    with pytest.raises(checkpoint.CheckpointWriteError) as info:
        checkpoint.save(tmp_path / "c.pt", {"epoch": 1})
    assert info.value.filename == str(tmp_path / "c.pt") and info.value.errno in (errno.ENOSPC, errno.EIO)


class RunsCode:
    """Unpickling this creates ``path``: what a malicious checkpoint could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_files_a_user_names_are_read_without_running_code(finished_run, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    state = checkpoint.load(finished_run / "checkpoint.pt")
    evil = tmp_path / "evil.pt"
    torch.save({**state, "format": checkpoint.FORMAT, "extra": RunsCode(marker)}, evil)
    weights = tmp_path / "weights.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": RunsCode(marker)}, weights)
    for args in (
        ["eval", str(evil)],
        ["train", "--resume", str(evil)],
        ["analyze", "gradcam", str(evil), "--out", str(tmp_path / "a")],
    ):
        code, _, err = run_cli(args, capsys)
        assert "weights_only=True" in one_error_line(err, code), args
    sr = ["-c", "configs/super_resolution/smoke_edsr_tiny_photos.yaml"]
    for args in (
        [*TINY, "model.backbone=resnet18", f"model.pretrained={weights}"],
        [*sr, f"task.super_resolution.pretrained={weights}"],
    ):
        code, _, err = run_cli(["train", *args, f"out_dir={tmp_path / 'out'}"], capsys)
        assert "cannot read" in one_error_line(err, code), (args, err)
    assert not marker.exists() and not (tmp_path / "out").exists()
    # our own files hold plain types only, and an older file with numpy values still loads
    checkpoint.save(tmp_path / "np.pt", {"config": {}, "model": {}, "epoch": np.int64(1), "m": np.ones(2)})
    assert checkpoint.load(tmp_path / "np.pt")["epoch"] == 1
    torch.save({"format": checkpoint.FORMAT, "config": {}, "model": {}, "epoch": np.float64(2)}, evil)
    assert checkpoint.load(evil)["epoch"] == 2


# -- 7. the whole bad-input table through the command line (tests/probe_bad_inputs.py) ---------------
def test_bad_input_table_in_process():
    from tests import probe_bad_inputs as probe

    failed = probe.probe(probe.CASES, probe.run_in_process, report=lambda line: None)
    assert not failed, [(r.case.id, r.problems, r.err[-300:]) for r in failed]


def test_bad_input_table_as_a_real_process_one_case():
    """One interpreter start (~4 s unloaded): the module entry point, its stderr and exit code."""
    from tests import probe_bad_inputs as probe

    failed = probe.probe(probe.select(["eval-runs-code"]), report=lambda line: None)
    assert not failed, [(r.case.id, r.problems, r.err[-300:]) for r in failed]


@pytest.mark.slow  # one interpreter per case: ~3-10 s each
def test_bad_input_table_as_real_processes():
    from tests import probe_bad_inputs as probe

    failed = probe.probe(probe.CASES, report=lambda line: None)
    assert not failed, [(r.case.id, r.problems, r.err[-300:]) for r in failed]


class _Payload:
    """What a malicious ``data_batch_1`` holds: unpickling it would call ``pathlib.Path.touch``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_cifar_batch_holding_a_payload_runs_nothing(tmp_path, capsys):
    write_cifar(tmp_path)
    marker = tmp_path / "ran"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3], "x": _Payload(marker)}, f)
    with pytest.raises(DataError, match="nothing in the file was run"):
        load_datasets("cifar10", str(tmp_path))
    assert not marker.exists()
    code, _, err = run_cli(["train", "data.name=cifar10", f"data.root={tmp_path}"], capsys)
    assert "pathlib" in one_error_line(err, code) and not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_as_python_2_and_3_write_them_still_load(tmp_path, protocol):
    """The official batches are Python 2 pickles naming ``numpy.core.multiarray`` (numpy 1); Python 3
    writes ``numpy._core`` names, ``_codecs.encode`` for bytes (protocol 2) or ``_frombuffer`` (5)."""
    write_cifar(tmp_path)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    batch = {
        "batch_label": b"training batch 1 of 5",
        "data": data,
        "labels": [3, 1, 2, 0],
        "filenames": [b"a.png"] * 4,
    }
    raw = pickle.dumps(batch, protocol=protocol)
    if protocol == 2:  # as numpy 1 named them, the way the official files do
        raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert b"cnumpy.core.multiarray\n_reconstruct" in raw
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(raw)
    train, _ = load_datasets("cifar10", str(tmp_path))
    assert torch.equal(train.images[:4], torch.from_numpy(data.reshape(4, 3, 32, 32)))
    assert train.labels[:4].tolist() == [3, 1, 2, 0]
