"""``locallearn train|eval|plan|list|bench|analyze``: the command line. The only module that prints."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path

from locallearn.analysis import ANALYSES
from locallearn.analysis import add_common_arguments as add_analysis_arguments
from locallearn.bench import accuracy, evidence, memory, pipeline, speed
from locallearn.config import ConfigError

log = logging.getLogger("locallearn")

# `locallearn bench NAME`: a bench is a module with add_arguments(parser) and main(args) -> Markdown report.
BENCHES = {"memory": memory, "speed": speed, "accuracy": accuracy, "pipeline": pipeline, "evidence": evidence}

# `locallearn train` with no arguments: InfoPro+MAN++ against bp on the embedded digits, ~2 min on 2 cores.
QUICKSTART = {
    "data": {"name": "digits", "batch_size": 64, "test_batch_size": 512},
    "model": {"backbone": "resnet32", "num_blocks": 16, "split": "infopro"},
    # 8x8 digits are easy to reconstruct: weigh the classifier more than InfoPro's CIFAR rows do
    "method": {
        "name": "infopro+manpp",
        "infopro": {"loss": "cross_entropy", "ixx_1": 1.0, "ixy_1": 1.0, "ixx_2": 0.1, "ixy_2": 1.0},
    },
    "optim": {"lr": 0.1, "epochs": 12, "warmup_epochs": 1.0},
    "compare": ["bp"],
    "engine": {"device": "auto"},
    "checkpoint_every": 1,
}


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) during a run; the message says what the run directory holds."""

    def __init__(self, message: str, code: int = 130) -> None:
        super().__init__(message)
        self.code = code


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler's stop): handled exactly as Ctrl-C, so the checkpoint on disk
    stays intact (a save in progress removes its temp file) and the run resumes exactly; exit 143."""


def _terminate(signum, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While training, SIGTERM raises ``Terminated`` (a ``KeyboardInterrupt``) instead of killing the
    process where it stands (Python's default for SIGTERM: no cleanup, no message, a lock left behind)."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave the default
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def quickstart_base(overrides: list[str]) -> dict | None:
    """Without ``-c`` the offline digits job is the base for any overrides, unless they name the data.
    Its comparison and InfoPro options follow only where they apply."""
    import copy

    from locallearn.config import parse_override

    given = {".".join(keys): value for keys, value in map(parse_override, overrides)}
    if "data.name" in given or "data" in given:
        return None
    base = copy.deepcopy(QUICKSTART)
    if given.get("engine.mode", "sequential") != "sequential":
        del base["compare"]  # under torchrun, one job per method
    method = given.get("method.name")
    if method is not None and str(method).partition("+")[0] != "infopro":
        base["method"] = {"name": method}
    if "model.backbone" in given:
        del base["model"]["split"]  # InfoPro's split table covers only some backbones
    return base


def fit(run):
    try:
        return run.fit()
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated):
            message = run.interrupted_message().replace("interrupted", "terminated (SIGTERM)", 1)
            raise Interrupted(message, 143) from None
        raise Interrupted(run.interrupted_message()) from None


def fail(message: str, code: int = 2) -> None:
    print(f"locallearn: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def setup_logging(run_dir: Path | None = None, verbose: bool = True, main_rank: bool = True) -> None:
    """``main_rank=False`` (torchrun ranks other than 0): errors only on the console; the warnings every rank
    raises alike (config, aux sizes) are rank 0's to print, once, not once per rank."""
    root = logging.getLogger("locallearn")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    console.setLevel(logging.INFO if verbose else logging.WARNING if main_rank else logging.ERROR)
    root.addHandler(console)
    if run_dir is not None:
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)


# How the summary table shows a task's main metric (``summary["metric"]``): its unit; percent otherwise.
METRIC_UNITS = {"psnr": "dB", "psnr_rgb": "dB", "ssim": "", "loss": ""}


def metric_label(metric: str) -> str:
    return "test acc" if metric == "top1" else f"test {metric}"


def fmt_metric(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    unit = METRIC_UNITS.get(metric, "%")
    return f"{value:.4f}" if unit == "" else f"{value:.2f}{unit}"


def print_table(summaries: list[dict]) -> None:
    from locallearn.metrics.memory import fmt_bytes

    bp = next((s for s in summaries if s["method"] == "bp"), None)
    metric = summaries[0].get("metric", "top1") if summaries else "top1"
    label = metric_label(metric)
    w = max(len(label), 9)
    header = (
        f"{'method':<18} {'K':>3} {label:>{w}} {'best':>7} {'peak train mem':>14} {'vs bp':>6} "
        f"{'peak act. mem':>14} {'step':>8} {'params (aux)':>18}"
    )
    print(header)
    print("-" * len(header))
    for s in summaries:
        act = s["memory"].get("peak_activation_bytes")
        total = s["memory"].get("peak_total_bytes")
        bp_total = bp["memory"].get("peak_total_bytes") if bp else None
        ratio = f"{total / bp_total:.2f}x" if total and bp_total else "-"
        params = f"{s['params']['backbone'] / 1e6:.2f}M ({s['params']['aux'] / 1e6:.2f}M)"
        print(
            f"{s['method']:<18} {s['num_blocks']:>3} {fmt_metric(s['final'], metric):>{w}} "
            f"{fmt_metric(s['best'], metric):>7} {fmt_bytes(total) if total else '-':>14} {ratio:>6} "
            f"{fmt_bytes(act) if act else '-':>14} {s['median_step_time_s'] * 1e3:>6.0f}ms {params:>18}"
        )
    if summaries:
        s = summaries[0]
        # torchrun: the memory (and this batch) is one rank's; data.batch_size is the global batch
        per_rank = " per rank" if s.get("engine", {}).get("world_size", 1) > 1 else ""
        print(
            f"\n{s['dataset']}, {s['train_images']} training images, {s['epochs']} epochs, "
            f"batch {s['memory'].get('batch_size', '?')}{per_rank}, device {s['device']}. "
            "Peak train memory = weights + optimizer state + the largest block's gradients, saved "
            "activations and backward workspace; peak act. mem = bytes saved for backward, largest block "
            "(docs/benchmarks.md)."
        )
        for s in summaries:
            print(f"  {s['method']}: {s['run_dir']}")


def data_label(run) -> str:
    """The dataset as the train log names it; folder data: the folder's name, its classes and size."""
    data = run.train_loader.data
    if run.cfg.data.name != "folder":
        return run.cfg.data.name
    classes = ", ".join(data.classes[:10]) + (", ..." if len(data.classes) > 10 else "")
    return f"{data.name} ({len(data.classes)} classes: {classes}; {data.size} px)"


def cmd_train(args: argparse.Namespace) -> None:
    from locallearn.config import dump_yaml, load_config
    from locallearn.data.folder_defaults import folder_defaults
    from locallearn.run.launch import comparison_config, make_run, resume_run, resumed_config

    if args.resume and args.print_config:
        print(dump_yaml(resumed_config(args.resume, args.config, args.overrides)), end="")
        return
    # the console from the start: what loading the data logs (folder classes, sizes) is shown too;
    # under torchrun only rank 0 speaks. The run's own log file joins once the run directory exists.
    main = os.environ.get("RANK", "0") == "0"
    setup_logging(verbose=main, main_rank=main)
    if args.resume:
        run = resume_run(args.resume, config_file=args.config, overrides=args.overrides)
        setup_logging(
            run.run_dir if run.is_main else None, verbose=run.is_main, main_rank=run.is_main
        )  # torchrun: rank 0 speaks
        summaries = [fit(run)]
        if run.is_main:
            print_table(summaries)
        return
    base = QUICKSTART if args.quickstart else None
    if args.config is None and not args.quickstart:
        base = quickstart_base(args.overrides)
    cfg = load_config(args.config, args.overrides, base=base)
    cfg, defaults_note = folder_defaults(
        lambda ours: load_config(args.config, args.overrides, base=ours), cfg
    )
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return
    configs = [cfg] + [comparison_config(cfg, m) for m in cfg.compare]
    summaries = []
    for c in configs:
        run = make_run(c)
        setup_logging(run.run_dir if run.is_main else None, verbose=run.is_main, main_rank=run.is_main)
        if defaults_note:
            log.info(defaults_note)
        n = run.model.frozen_blocks
        log.info(
            "training %s on %s (K=%d, cuts %s%s) -> %s",
            c.method.name,
            data_label(run),
            run.model.num_blocks,
            run.model.cuts,
            f"; blocks 0-{n - 1} and their aux nets frozen" if n else "",
            run.run_dir,
        )
        summaries.append(fit(run))
    if run.is_main:
        print()
        print_table(summaries)


def cmd_eval(args: argparse.Namespace) -> None:
    from locallearn.run.launch import evaluate_checkpoint

    setup_logging()
    result = evaluate_checkpoint(args.checkpoint, args.device)
    print(json.dumps(finite_json(result), indent=2, allow_nan=False))


def finite_json(value):
    """``value`` with NaN and infinities as ``null``: ``json.dumps`` would write a bare ``NaN``, which
    strict JSON parsers refuse (a checkpoint whose weights went NaN evaluates to a NaN loss)."""
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def cmd_list(args: argparse.Namespace) -> None:
    import torch

    from locallearn.build import BACKBONES, METHODS, MOMENTUM, TASKS, method_names
    from locallearn.data import DATASETS
    from locallearn.split import TABLES

    print("backbones:")
    for name, make in BACKBONES.items():
        with torch.device("meta"):  # count layers without allocating or initialising weights
            layers = len(make(in_chans=3))
        print(f"  {name:<12} {layers} layers")
    print(
        "  any model: model.backbone=torchvision:NAME | timm:NAME | package.module:factory (num_classes=\n"
        "    from the data), split at its stages or at model.cut_at=[module names]; its own classifier is\n"
        "    the head; `locallearn export RUN OUT.pt` writes its state dict (docs/backbones.md, Any model)"
    )
    print("methods:")
    for name, cls in METHODS.items():
        print(f"  {name:<12} {cls.paper}")
    composable = [name for name, cls in METHODS.items() if cls.composes_with_momentum]
    print(
        f"  momentum aux {', '.join('+' + m for m in MOMENTUM)} composes with: {', '.join(composable)}"
        f" (not {', '.join(n for n in METHODS if n not in composable)})"
    )
    print(f"  all names: {', '.join(method_names())}")
    print("tasks:\n  " + ", ".join(TASKS))
    print("datasets:\n  " + ", ".join(DATASETS))
    print(
        "  folder: data.root=DIR with train/<class>/* and val/<class>/*, data.image_size=N (default 224);\n"
        "    batch, lr and epochs default to values sized to the folder (docs/usage.md)"
    )
    print("split tables (model.split=NAME model.num_blocks=K):")
    for table, arches in TABLES.items():
        for arch, ks in arches.items():
            print(f"  {table:<17} {arch:<10} K = {', '.join(str(k) for k in [1, *ks])}")
    print("  even              any        K = 1..number of layers")


def cmd_export(args: argparse.Namespace) -> None:
    from locallearn.export import export_run

    setup_logging()
    print(export_run(args.run, args.out, args.device))


def cmd_bench(args: argparse.Namespace) -> None:
    setup_logging()
    print(args.bench_main(args))


def cmd_analyze(args: argparse.Namespace) -> None:
    setup_logging()
    print(args.analysis_main(args))


def cmd_plan(args: argparse.Namespace) -> None:
    from locallearn.plan import parse_bytes, plan_config, table

    setup_logging(verbose=args.verbose)
    try:
        budget = parse_bytes(args.memory)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    base = quickstart_base(args.overrides) if args.config is None else None
    if base is not None:
        base.pop("compare", None)  # the plan trains one method; bp is in the table
    overrides = list(args.overrides)
    if args.config is not None:
        from locallearn.config import load_yaml

        base = load_yaml(args.config)
    result, train_overrides = plan_config(overrides, budget, base, dry_run=not args.no_dry_run)
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    elif result.fits:
        print("\n".join(table(result)))
        measured = result.measured_peak_total_bytes
        from locallearn.metrics.memory import fmt_bytes

        check = f"; one measured step: {fmt_bytes(measured)}" if measured is not None else ""
        print(f"\nfits {fmt_bytes(budget)} at batch {result.batch_size}{check}. Train it with:")
        config = f"-c {args.config} " if args.config else ""
        prefix = "compare=[] " if args.config is None else ""
        print(f"  locallearn train {config}{prefix}{' '.join(train_overrides)}")
    if not result.fits:
        if not args.json:
            print(f"locallearn: {result.needed}", file=sys.stderr)
        raise SystemExit(1)


def config_keys_help() -> str:
    """``train --help``: every config section and its keys (``--print-config`` shows the values)."""
    import dataclasses
    import textwrap

    from locallearn.config import Config

    lines = ["config keys (key=value overrides; see the values with --print-config):"]
    sections = [f for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)]
    top = [f.name for f in dataclasses.fields(Config) if f not in sections]
    lines += textwrap.wrap(", ".join(top), 100, initial_indent="  ", subsequent_indent="    ")
    for f in sections:
        keys = ", ".join(k.name for k in dataclasses.fields(f.default_factory) if k.name != "options")
        lines += textwrap.wrap(f"{f.name}: {keys}", 100, initial_indent="  ", subsequent_indent="    ")
    lines.append("  method.<base method>.<option>, method.momentum.<option>: a method's own options")
    return "\n".join(lines)


def add_trust_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-module",
        action="append",
        default=[],
        metavar="PACKAGE.MODULE:FACTORY",
        help="let a checkpoint's config build this model.backbone: building it imports and runs that module, "
        "so a file someone handed you may name it only if you name it here too",
    )


def trusted_modules(args: argparse.Namespace) -> list[str]:
    """The ``package.module:factory`` specs this command names: ``--trust-module`` and, for ``train``,
    a ``model.backbone=`` override (naming it on the command line trusts it for ``--resume``)."""
    from locallearn.config import parse_override

    named = list(getattr(args, "trust_module", []))
    for override in getattr(args, "overrides", None) or []:
        try:
            keys, value = parse_override(override)
        except ConfigError:
            continue  # reported where the overrides are applied
        if ".".join(keys) == "model.backbone" and isinstance(value, str):
            named.append(value)
    return named


DESCRIPTION = (
    "Supervised local learning for PyTorch vision models: a network is cut into K gradient-isolated "
    "blocks, each trained by its own small auxiliary network (DGL, InfoPro, MAN++, ...) instead of "
    "end-to-end backpropagation. `locallearn train` with no arguments runs the offline quick start; "
    "`locallearn list` shows the models, methods and datasets."
)


def resume_help() -> str:
    from locallearn.resume import SAFE_ON_RESUME

    return (
        "continue a run from its directory or checkpoint.pt; overrides may change only "
        + ", ".join(SAFE_ON_RESUME)
        + " (optim.epochs not below the epochs trained)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="locallearn", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train a model",
        description="Train with a YAML config and dotted overrides (optim.lr=0.05). With no arguments at all, "
        "runs the quick start: InfoPro+MAN++ and bp on the embedded digits data, side by side.",
        epilog=config_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("-c", "--config", help="YAML config file")
    train.add_argument(
        "--resume",
        metavar="RUN",
        help=resume_help(),
    )
    train.add_argument("--quickstart", action="store_true", help="start from the quick-start settings")
    add_trust_argument(train)
    train.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML and exit (trains nothing)",
    )
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.num_blocks=8")
    train.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="evaluate a checkpoint on its test set")
    ev.add_argument("checkpoint", help="checkpoint.pt or its run directory")
    ev.add_argument("--device", default="auto")
    add_trust_argument(ev)
    ev.set_defaults(func=cmd_eval)
    ex = sub.add_parser(
        "export",
        help="write a run's model as its source model's own state dict (torchvision / timm / your model)",
    )
    ex.add_argument("run", metavar="RUN", help="run directory (or its checkpoint.pt)")
    ex.add_argument("out", metavar="OUT.pt", help="file to write (torch.save of a state dict)")
    ex.add_argument("--device", default="cpu", help="device for the output check (default cpu)")
    add_trust_argument(ex)
    ex.set_defaults(func=cmd_export)
    pl = sub.add_parser(
        "plan",
        help="choose K, cuts, recomputation and the batch that fit a memory budget",
        description="Plan a run for a memory budget: the smallest K (and its cuts, momentum.recompute or mlaan.recompute, the largest "
        "batch when data.batch_size is not given) whose whole training step fits, next to bp and activation "
        "checkpointing, confirmed by one measured step. Prints the overrides to train it with.",
    )
    pl.add_argument("--memory", required=True, help="the budget, e.g. 8GiB, 512MiB")
    pl.add_argument("-c", "--config", help="YAML config file")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("--no-dry-run", action="store_true", help="skip the measured step at the planned batch")
    pl.add_argument("-v", "--verbose", action="store_true", help="log each candidate measured")
    pl.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.backbone=resnet110")
    pl.set_defaults(func=cmd_plan)
    ls = sub.add_parser("list", help="list backbones, methods, tasks, datasets and split tables")
    ls.set_defaults(func=cmd_list)
    bench = sub.add_parser("bench", help="benchmarks: write tables and plots into benchmarks/results/")
    benches = bench.add_subparsers(dest="bench", required=True)
    for name, module in BENCHES.items():
        doc = module.__doc__ or name
        b = benches.add_parser(name, help=doc.splitlines()[0], description=doc)
        module.add_arguments(b)
        b.set_defaults(func=cmd_bench, bench_main=module.main)
    analyze = sub.add_parser("analyze", help="analyses of trained runs: CKA, Grad-CAM, linear probes, curves")
    analyses = analyze.add_subparsers(dest="analysis", required=True)
    for name, module in ANALYSES.items():
        doc = module.__doc__ or name
        a = analyses.add_parser(name, help=doc.splitlines()[0], description=doc)
        add_analysis_arguments(a)
        add_trust_argument(a)
        module.add_arguments(a)
        a.set_defaults(func=cmd_analyze, analysis_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from locallearn.backbones.sources import trust_modules
    from locallearn.data import DataError
    from locallearn.engine.checkpoint import CheckpointError
    from locallearn.engine.distributed import DistributedError
    from locallearn.engine.errors import DivergedError

    try:
        with trust_modules(trusted_modules(args)):
            if args.func is cmd_train:
                with sigterm_as_interrupt():
                    args.func(args)
            else:
                args.func(args)
    except (ConfigError, DataError, CheckpointError, DistributedError) as e:
        fail(str(e))
    except DivergedError as e:
        fail(str(e), 3)
    except OSError as e:  # a full disk, a file that became unwritable: the previous checkpoint is intact
        where = f" {e.filename!r}" if e.filename else ""
        fail(f"cannot read or write{where}: {e.strerror or e}", 1)
    except Interrupted as e:
        fail(str(e), e.code)
    except KeyboardInterrupt as e:
        fail(
            "interrupted before training started: nothing was saved",
            143 if isinstance(e, Terminated) else 130,
        )


if __name__ == "__main__":
    main()
