"""The ``menseg`` command line. Heavy modules are imported inside the commands.

User errors (:class:`menseg.errors.MensegError`) are printed as one line on
stderr with exit code 2; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from menseg.errors import MensegError

app = typer.Typer(
    name="menseg",
    help="Data-efficient 3D meningioma segmentation from multi-modal MRI (t1c, t1n, t2f, t2w).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Check and convert datasets (BraTS-MEN and nnU-Net v2 layouts).",
                       no_args_is_help=True)
bench_app = typer.Typer(help="Measured benchmarks.", no_args_is_help=True)
sim2real_app = typer.Typer(help="Sim2Real: carry synthetic meningiomas over to your scanner's appearance.",
                           no_args_is_help=True)
models_app = typer.Typer(help="Named models: the shipped ones and folders of exported ones "
                              "(MENSEG_MODELS_DIR).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(sim2real_app, name="sim2real")
app.add_typer(bench_app, name="bench")
app.add_typer(bench_app, name="benchmark", hidden=True)  # the name used before 0.2

_state = {"debug": False, "verbose": False}
log = logging.getLogger("menseg")


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug-level logging.")] = False,
    max_voxels: Annotated[
        int | None,
        typer.Option("--max-voxels", help="Refuse images with more voxels than this (default 512^3; "
                     "env MENSEG_MAX_VOXELS)."),
    ] = None,
) -> None:
    import os

    from menseg.utils import context_from_env

    _state["debug"], _state["verbose"] = debug, verbose
    if max_voxels is not None:  # through the environment, so processes started from here see it too
        if max_voxels < 1:
            raise MensegError(f"--max-voxels must be at least 1, got {max_voxels}")
        os.environ["MENSEG_MAX_VOXELS"] = str(max_voxels)
    # Under torchrun every rank runs this: rank 0 logs as one process would, the others only warnings.
    run = context_from_env()
    if run.enabled and ctx.invoked_subcommand != "train":
        # every process would write the same outputs: only training is distributed
        raise MensegError(f"'menseg {ctx.invoked_subcommand}' runs in one process; of the commands only "
                          "'menseg train' runs under torchrun")
    if not run.main:
        os.environ["TQDM_DISABLE"] = "1"  # one progress bar per run: rank 0's
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO if run.main else logging.WARNING,
        format=f"%(levelname)s{f' [rank {run.rank}]' if run.enabled else ''} %(name)s: %(message)s",
        stream=sys.stderr,
    )


@data_app.command("check")
def data_check(
    root: Annotated[Path, typer.Argument(help="Dataset folder (BraTS or nnU-Net v2 raw layout).")],
) -> None:
    """Validate a dataset and print one row per case (sequences, shape, spacing, label volumes).

    Cases lacking some of t1c/t1n/t2f/t2w are listed with the sequences they have; only a
    case with no image (or a label without any image) is refused.
    """
    from rich.table import Table

    from menseg.data.validate import check_dataset

    reports = check_dataset(root)
    n_part = sum(bool(r.missing) for r in reports)
    table = Table(title=f"{root} — {len(reports)} case(s), all valid"
                  + (f"; {n_part} incomplete (models trained with seqdrop.enabled=true or ism.modal use them)"
                     if n_part else ""))
    for col in ("case", "sequences", "shape", "spacing (mm)", "orient", "dtype", "NETC mm³", "SNFH mm³",
                "ET mm³"):
        table.add_column(col, justify="right" if "mm" in col else "left")
    for r in reports:
        vols = r.label_volumes_mm3 or {}
        table.add_row(
            r.case_id,
            " ".join(r.sequences) + (f" (no {', '.join(r.missing)})" if r.missing else ""),
            "x".join(str(s) for s in r.shape),
            "x".join(f"{s:.2f}" for s in r.spacing),
            r.orientation,
            r.dtype,
            *(f"{vols[k]:.0f}" if k in vols else "-" for k in (1, 2, 3)),
        )
    _console().print(table)


@data_app.command("convert")
def data_convert(
    src: Annotated[Path, typer.Argument(help="Source dataset folder.")],
    dst: Annotated[Path, typer.Argument(help="Destination folder (must not exist or be empty).")],
    to: Annotated[str, typer.Option("--to", help="Target layout: brats or nnunet.")] = "nnunet",
) -> None:
    """Convert a dataset between the BraTS and nnU-Net v2 layouts (files copied byte for byte)."""
    from menseg.data.layouts import convert_dataset

    if to not in ("brats", "nnunet"):
        raise MensegError(f"--to must be 'brats' or 'nnunet', got '{to}'")
    n = convert_dataset(src, dst, to)
    typer.echo(f"converted {n} case(s) to the {to} layout in {dst}")


@app.command("train", context_settings={"allow_extra_args": False})
def train_cmd(
    config: Annotated[str, typer.Argument(help="YAML config path or packaged name (baseline, demo).")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Dotted overrides, e.g. data=DIR train.steps=500 out_dir=runs/x."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from out_dir/latest.pt.")] = False,
    nproc: Annotated[
        int,
        typer.Option("--nproc", help="Processes on this machine (DDP; one per GPU on CUDA): a shortcut "
                     "for torchrun --standalone --nproc_per_node=N -m menseg train ... (multi-node: see "
                     "README)."),
    ] = 1,
) -> None:
    """Train a segmentation model; the resolved config is saved in the run folder.

    train.batch_size is the global batch: under DDP each of N processes trains on batch_size / N samples.
    """
    from menseg.config import load_config
    from menseg.utils import context_from_env

    cfg = load_config(config, overrides or [])  # fail fast on a bad config, before heavy imports
    if nproc < 1:
        raise MensegError(f"--nproc must be at least 1, got {nproc}")
    run = context_from_env()
    if nproc > 1:
        if run.enabled:
            raise MensegError("--nproc is for starting processes; this one already runs under torchrun")
        from menseg.train.distributed import Context, launch, shard
        from menseg.train.trainer import preflight

        shard(cfg.train.batch_size, Context(0, nproc, 0))  # a batch that does not split: fail before starting
        preflight(cfg, resume)  # a wrong folder or data path: one line now, not N processes failing
        root = [flag for flag, on in (("--debug", _state["debug"]), ("--verbose", _state["verbose"])) if on]
        argv = [*root, "train", config, *(overrides or []), *(["--resume"] if resume else [])]
        rc = launch(nproc, argv)
        if rc:
            raise MensegError(f"distributed training failed (torchrun exit code {rc}; the first failing "
                              "rank's error is above)")
        return
    from menseg.checkpoint import run_checkpoint, run_files
    from menseg.train.trainer import train

    run_dir = train(cfg, resume=resume)
    if run.main:
        typer.echo(f"run folder: {run_dir} ({', '.join(run_files(run_dir))}; "
                   f"'menseg predict {run_dir} ...' uses {run_checkpoint(run_dir).name})")


@app.command("predict")
def predict_cmd(
    args: Annotated[
        list[Path],
        typer.Argument(metavar="[MODEL] INPUT... OUTPUT",
                       help="MODEL: a checkpoint, a run folder (its best.pt; latest.pt when the run "
                            "validated nothing) or a model name (menseg models list); left out, the shipped "
                            "model. "
                            "INPUT: a case folder, a dataset folder, or the four image files of one case. "
                            "OUTPUT: a folder (or a .nii.gz path for one case)."),
    ],
    model_opt: Annotated[
        str | None, typer.Option("--model", help="The model (name, checkpoint or run folder), instead of the "
                                                 "first argument.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    mirror: Annotated[
        bool | None,
        typer.Option("--mirror/--no-mirror", help="Test-time mirroring (8 flips); default from the model."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Predict again cases whose output exists (default: skip them; inputs are "
                           "never replaced).")
    ] = False,
    overlap: Annotated[
        float | None, typer.Option(help="Sliding-window overlap in [0, 1); default from the model.")
    ] = None,
    precision: Annotated[
        str | None, typer.Option(help="fp32, bf16 (autocast) or auto; default from the model.")
    ] = None,
    prior: Annotated[
        Path | None,
        typer.Option(help="An earlier visit of the one input case (case folder); needs a model trained "
                          "with ism.temporal, and --gap-days."),
    ] = None,
    gap_days: Annotated[
        float | None, typer.Option(help="Days from the --prior visit to the input case.")
    ] = None,
    learned_postprocess: Annotated[
        bool,
        typer.Option("--learned-postprocess/--fixed-postprocess",
                     help="Apply the post-processing the run learned (postprocess.learn) when its checkpoint "
                          "has one; --fixed-postprocess removes components below infer.min_component_mm3."),
    ] = True,
    keep_going: Annotated[
        bool, typer.Option(help="Predict every case that can be; write the others' errors to OUT/errors.csv "
                           "and exit non-zero at the end if any failed.")
    ] = False,
    sequences: Annotated[
        str | None, typer.Option(help="Predict from these sequences only, e.g. t1c,t2f, ignoring the others "
                                 "where present (to compare); the model must accept a subset.")
    ] = None,
) -> None:
    """Predict BraTS-MEN labels, written in each input's own space (shape, affine, orientation).

    menseg predict [MODEL] INPUT... OUTPUT. Without MODEL (or --model) the shipped model is used and
    the log says so. A case may lack some of the four sequences if the model was trained with sequence
    dropout or modal fusion: it is then segmented from those present, and the log says which were used.
    Beside each label, <case>.json records the model, the sequences used and missing, the
    post-processing and the menseg version. Cases already predicted are skipped (--overwrite).
    """
    from menseg.infer.predict import predict
    from menseg.models import looks_like_model

    if len(args) < 2:
        raise MensegError("give at least an INPUT and an OUTPUT: menseg predict [MODEL] INPUT... OUTPUT")
    *inputs, output = args
    model: str | Path | None = model_opt
    if model is None and len(inputs) >= 2 and looks_like_model(inputs[0]):
        model, inputs = inputs[0], inputs[1:]
    source: Path | list[Path] = inputs[0] if len(inputs) == 1 else list(inputs)
    written = predict(model, source, output, device=device, mirror=mirror, overwrite=overwrite,
                      overlap=overlap, precision=precision, prior=prior, gap_days=gap_days,
                      learned_postprocess=learned_postprocess, keep_going=keep_going,
                      sequences=sequences.split(",") if sequences is not None else None)
    for p in written:
        typer.echo(str(p))


@models_app.command("list")
def models_list_cmd() -> None:
    """Every named model: the shipped ones, then those in the folders of MENSEG_MODELS_DIR."""
    from menseg.models import MODELS_ENV, list_models

    entries = list_models()
    if not entries:
        typer.echo(f"no models: this menseg ships none yet, and {MODELS_ENV} names no folder with any")
        return
    width = max(len(e.name) for e in entries)
    for e in entries:
        where = "shipped" if e.shipped else str(e.weights.parent)
        flag = " (default)" if e.default and e.shipped else ""
        typer.echo(f"{e.name:<{width}}  {e.bytes / 1e6:5.1f} MB  {where}{flag}  {e.summary}")
    typer.echo("model cards: menseg models show NAME")


@models_app.command("show")
def models_show_cmd(name: Annotated[str, typer.Argument(help="A model name (menseg models list).")]) -> None:
    """Print a model's card (training data and recipe, measured figures, licence, intended use) and check
    its weights against its checksum."""
    from menseg.models import find_model

    entry = find_model(name)
    typer.echo(entry.card.read_text() if entry.card.is_file() else f"{name}: no model card ({entry.card})")
    typer.echo(f"weights: {entry.weights} ({entry.bytes / 1e6:.1f} MB, sha256 {entry.sha256[:12]}…, checked)")


@models_app.command("export")
def models_export_cmd(
    source: Annotated[str, typer.Argument(help="A run folder, a checkpoint or a model name.")],
    name: Annotated[str, typer.Argument(help="The model's name (letters, digits, '-', '_', '.').")],
    out: Annotated[Path, typer.Option(help="Folder receiving NAME.pt, NAME.json and NAME.md (add it to "
                                           "MENSEG_MODELS_DIR to use the name).")] = Path("models"),
    summary: Annotated[str, typer.Option(help="One line saying what the model is for.")] = "",
    card: Annotated[Path | None, typer.Option(help="A Markdown model card to ship with it (default: a short "
                                                   "card written from the run, to complete).")] = None,
    half: Annotated[bool, typer.Option(help="Store the weights in fp16 (half the size).")] = False,
    default: Annotated[bool, typer.Option(help="Mark it as the default model of its folder.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a model of that name in OUT.")] = False,
) -> None:
    """Export a trained run as a named model: weights only (no optimiser state), with a checksum and a card,
    to share or to fine-tune from (model.init=NAME)."""
    from menseg.models import export_model

    entry = export_model(source, name, out, summary=summary, card=card, default=default, half=half,
                         overwrite=overwrite)
    typer.echo(f"{entry.name}: {entry.weights} ({entry.bytes / 1e6:.1f} MB), card {entry.card}")


@app.command("evaluate")
def evaluate_cmd(
    pred: Annotated[Path, typer.Argument(help="Folder of predicted <case>.nii.gz labels.")],
    ref: Annotated[Path, typer.Argument(help="Reference: BraTS layout or flat folder of labels.")],
    out: Annotated[Path, typer.Option("--out", help="Where metrics.csv and summary.json go.")],
) -> None:
    """Lesion-wise (BraTS 2023 MEN) and legacy metrics per case and summarised."""
    from menseg.evaluate.runner import evaluate_folders

    summary = evaluate_folders(pred, ref, out)
    _print_summary(summary)
    typer.echo(f"wrote {out / 'metrics.csv'} and {out / 'summary.json'}")


@app.command("review")
def review_cmd(
    pred: Annotated[Path, typer.Argument(help="Folder of predicted <case>.nii.gz labels ('menseg predict' "
                                               "output); verdicts are saved to PRED/review.csv.")],
    images: Annotated[Path, typer.Option("--images", help="The images the predictions were made from (any "
                                                          "layout 'menseg predict' reads).")],
    ref: Annotated[
        Path | None, typer.Option("--ref", help="Reference labels (BraTS layout or flat folder): a second "
                                                "overlay, and lesion-wise metrics unless --metrics is given.")
    ] = None,
    metrics: Annotated[
        Path | None, typer.Option("--metrics", help="An evaluation folder ('menseg evaluate --out') or its "
                                                    "metrics.csv, for the index's Dice and lesion counts.")
    ] = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (default: a free one).")] = 0,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the pages as a static folder (open its index.html, or "
                                                "share it) instead of serving them; verdicts are then "
                                                "downloaded as a CSV.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder written by 'menseg "
                                                 "review'.")] = False,
) -> None:
    """Look at every prediction in the browser, flag the bad ones, keep the decisions.

    Serves, on 127.0.0.1 only, an index of the cases that have a prediction (worst first when a
    reference or evaluation is given) and a NiiVue page per case: the four sequences (keys 1-4),
    the prediction over them (r flips to the reference, o hides it), axial/coronal/sagittal/
    multiplanar views (a/c/s/m), a jump to each lesion, and a verdict (accept / needs correction /
    reject, with a note) saved at once to PRED/review.csv. No internet and no GPU needed.
    """
    from menseg.review.cases import collect_cases
    from menseg.review.site import ReviewSite

    if port < 0 or port > 65535:
        raise MensegError(f"--port must be 0 (a free port) to 65535, got {port}")
    cases = collect_cases(pred, images, ref, metrics)
    if out is not None:
        index = ReviewSite(cases, pred, mode="static").write(out, overwrite=overwrite)
        typer.echo(f"wrote {len(cases)} case(s): open {index}")
        return
    from menseg.review.server import ReviewServer

    server = ReviewServer(ReviewSite(cases, pred, mode="server"), port)
    typer.echo(f"menseg review: {server.url} ({len(cases)} case(s); verdicts go to {pred / 'review.csv'}; "
               "Ctrl-C stops)")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    typer.echo("menseg review: stopped")


def _console():  # noqa: ANN202 - rich is imported lazily
    """A rich console that does not squeeze tables to 80 columns when output is piped."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    from menseg.constants import REGION_NAMES

    means = summary.get("mean", {})
    table = Table(title=f"mean over {summary.get('n_cases', '?')} case(s)")
    table.add_column("metric")
    for r in REGION_NAMES:
        table.add_column(r, justify="right")
    for metric in ("lesion_dice", "lesion_hd95", "dice", "hd95", "surface_dice_1mm"):
        vals = [means.get(f"{r}_{metric}") for r in REGION_NAMES]
        table.add_row(metric, *("-" if v is None else f"{v:.3f}" for v in vals))
    alone = (summary.get("t1c_only") or {}).get("mean")
    if alone:  # the demo: the same cases predicted from t1c alone
        table.add_row("lesion_dice, t1c alone", *(f"{alone[f'{r}_lesion_dice']:.3f}" for r in REGION_NAMES))
    _console().print(table)


@bench_app.command("speed")
def bench_speed(
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quick: Annotated[bool, typer.Option(help="Tiny sizes, for a smoke test.")] = False,
    mirror: Annotated[
        str,
        typer.Option(help="Mirrored prediction: measure (all nets; slow on CPU), estimate (8x one "
                     "pass), default-only (measure the default net, estimate the rest)."),
    ] = "default-only",
    out: Annotated[Path | None, typer.Option(help="Also write the figures as JSON here.")] = None,
) -> None:
    """Training it/s, prediction s/case and peak memory: default model vs nnU-Net-sized.

    Both networks in fp32 and bf16 on one machine in one run, so the ratio is visible.
    On 2 CPU cores the full run takes about 30 minutes.
    """
    from menseg.bench.speed import benchmark_speed, render_speed
    from menseg.utils import write_json_atomic

    res = benchmark_speed(device=device, quick=quick, mirror=mirror)
    render_speed(res)
    if out is not None:
        write_json_atomic(out, res)


@bench_app.command("reference")
def bench_reference(
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quick: Annotated[bool, typer.Option(help="Tiny sizes, for a smoke test.")] = False,
    steps: Annotated[int, typer.Option(help="Measured training steps per lane.")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up steps per lane.")] = 5,
    precision: Annotated[
        str, typer.Option(help="fp32, bf16 (autocast, any device) or amp (train.amp_dtype auto: bf16 or "
                          "fp16 + loss scaling on a GPU, fp32 on CPU).")
    ] = "fp32",
    out: Annotated[Path | None, typer.Option(help="Keep the cohort, the menseg run and reference.json "
                                                  "here (an empty or new folder).")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Extra override of the menseg lane, repeatable, e.g. --set "
                     "train.channels_last=true --set train.compile=default."),
    ] = None,
) -> None:
    """Training steps/s and prediction s/case: menseg's trainer vs MONAI's reference DynUNet loop.

    Same network, patch, batch, device and precision, measured in one run on a generated cohort.
    """
    from menseg.bench.reference import benchmark_reference, reference_table

    res = benchmark_reference(device=device, quick=quick, steps=steps, warmup=warmup, precision=precision,
                              out_dir=out, menseg_set=set_ or ())
    typer.echo(reference_table(res))


@app.command("synth")
def synth_cmd(
    out: Annotated[Path, typer.Argument(help="Output folder (must not exist or be empty).")],
    cases: Annotated[
        int, typer.Option("--cases", "-n",
                          help="Cases (patients for longitudinal); with --inject, variants per scan.")
    ] = 10,
    layout: Annotated[str, typer.Option(help="brats, nnunet or longitudinal (not with --inject).")] = "brats",
    seed: Annotated[int, typer.Option(help="Seed; case i is replayable from (seed, i).")] = 0,
    visits: Annotated[
        int | None, typer.Option(help="Visits per patient (longitudinal layout; default 3).")
    ] = None,
    site: Annotated[
        str | None,
        typer.Option(help="Render with this scanner site's MR-physics model (site-a … site-d) "
                     "instead of the randomised appearance."),
    ] = None,
    spacing: Annotated[
        float | None, typer.Option(help="Isotropic voxel size in mm of the synthesis grid (default 1).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML file with SynthConfig sections (anatomy, lesion, …).")
    ] = None,
    inject: Annotated[
        Path | None,
        typer.Option(help="Inject synthetic meningiomas into the scans of this dataset (BraTS or "
                     "nnU-Net layout) instead of synthesising whole heads; --cases variants per scan."),
    ] = None,
    from_labels: Annotated[
        Path | None,
        typer.Option("--from-labels",
                     help="Synthesise on the integer label maps (*.nii.gz) of this folder, SynthSeg-style "
                     "(every class a random intensity), in each map's own grid; --cases per map."),
    ] = None,
    label_mapping: Annotated[
        Path | None,
        typer.Option(help="With --from-labels: JSON {class: wm|gm|csf|ventricle|dura|background}; "
                     "without a 'wm' class no oedema is painted."),
    ] = None,
    preview: Annotated[bool, typer.Option(help="Also write PNG mosaics (up to 16) in OUT/preview.")] = False,
    device: Annotated[
        str, typer.Option(help="auto, cpu or cuda (--inject, --from-labels: CPU only).")
    ] = "auto",
) -> None:
    """Write a synthetic meningioma dataset, with a JSON sidecar of each case's parameters.

    With --inject DIR, every scan of DIR gets --cases injected variants in its own grid
    (existing labels kept); DIR is never modified. With --from-labels DIR, every label map
    of DIR gets --cases synthetic cases (lesions painted, random intensity per class).
    """
    import dataclasses

    from menseg.synth.engine import SynthConfig, synth_dataset, with_spacing

    if layout not in ("brats", "nnunet", "longitudinal"):
        raise MensegError(f"--layout must be brats, nnunet or longitudinal, got '{layout}'")
    if cases < 1 or (visits is not None and visits < 1):
        raise MensegError("--cases and --visits must be at least 1")
    cfg = SynthConfig()
    if config is not None:
        import yaml

        if not config.is_file():
            raise MensegError("no such config file", config)
        cfg = SynthConfig.from_dict(yaml.safe_load(config.read_text()) or {})
    if label_mapping is not None and from_labels is None:
        raise MensegError("--label-mapping needs --from-labels")
    if from_labels is not None:
        from menseg.synth.from_labels import from_labels_dataset, load_label_mapping

        bad = [name for name, v in (("--inject", inject), ("--site", site), ("--spacing", spacing),
                                    ("--visits", visits)) if v is not None]
        if bad:
            raise MensegError(f"{', '.join(bad)} cannot be used with --from-labels (label-map synthesis "
                              "keeps each map's own grid and draws every class's intensity at random)")
        if layout == "longitudinal":
            raise MensegError("--from-labels writes the brats or nnunet layout, not longitudinal")
        if device.lower() not in ("auto", "cpu"):
            raise MensegError(f"--from-labels runs on the CPU only (got --device {device})")
        mapping = None if label_mapping is None else load_label_mapping(label_mapping)
        written = from_labels_dataset(from_labels, out, per_map=cases, seed=seed, mapping=mapping,
                                      lesion_cfg=cfg.lesion, appearance_cfg=cfg.appearance,
                                      layout=layout, preview=preview)  # type: ignore[arg-type]
        typer.echo(f"wrote {len(written)} label-map case(s) to {out} ({layout} layout)")
        return
    if inject is not None:
        from menseg.synth.inject import inject_dataset

        bad = [name for name, v in (("--site", site), ("--spacing", spacing), ("--visits", visits))
               if v is not None]
        if bad:
            raise MensegError(f"{', '.join(bad)} cannot be used with --inject (injection keeps each "
                              "scan's own grid and appearance)")
        if layout == "longitudinal":
            raise MensegError("--inject writes the brats or nnunet layout, not longitudinal")
        written = inject_dataset(inject, out, per_scan=cases, seed=seed, cfg=cfg.lesion,
                                 layout=layout, preview=preview, device=device)  # type: ignore[arg-type]
        typer.echo(f"wrote {len(written)} injected case(s) to {out} ({layout} layout)")
        return
    cfg = with_spacing(cfg, 1.0 if spacing is None else spacing)
    if site is not None:
        from menseg.synth.site import site_profile

        site_profile(site)  # validates the name
        cfg = dataclasses.replace(cfg, site=site)
    written = synth_dataset(out, cases, layout, seed=seed, cfg=cfg, preview=preview,
                            visits=3 if visits is None else visits, device=device)
    typer.echo(f"wrote {len(written)} case(s) to {out} ({layout} layout)")


@bench_app.command("synth")
def bench_synth(
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    n: Annotated[int, typer.Option("-n", help="Timed cases.")] = 10,
    site: Annotated[str | None, typer.Option(help="Time a site's MR-physics model instead.")] = None,
    spacing: Annotated[float, typer.Option(help="Isotropic voxel size, mm (grid 160x192x160 mm).")] = 1.0,
    out: Annotated[Path | None, typer.Option(help="Also write the figures as JSON here.")] = None,
) -> None:
    """Synthetic cases per second at 160x192x160 mm, with a per-stage breakdown."""
    from menseg.bench.synth import benchmark_synth, render_synth_bench
    from menseg.utils import write_json_atomic

    shape = tuple(max(8, round(f / spacing)) for f in (160, 192, 160))
    res = benchmark_synth(device=device, n=n, shape=shape, spacing=spacing, site=site)
    render_synth_bench(res, _console())
    if out is not None:
        write_json_atomic(out, res)


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MensegError(f"{what} must be comma-separated integers, e.g. 3,5,10; got '{text}'") from None


@bench_app.command("efficiency")
def bench_efficiency(
    out: Annotated[Path, typer.Option(help="Benchmark folder (rerun the command to resume it).")] = Path(
        "menseg-bench"
    ),
    data: Annotated[
        Path | None,
        typer.Option(help="Labelled dataset (BraTS or nnU-Net layout): the pool and the test split. "
                     "Default: the embedded synthetic site cohort."),
    ] = None,
    unlabeled: Annotated[
        Path | None, typer.Option(help="Extra scans without labels, for variants that use them.")
    ] = None,
    labeled: Annotated[
        str | None, typer.Option(help="Numbers of labelled cases, e.g. 3,5,10 (default: the profile's).")
    ] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per N (default: the profile's).")] = None,
    variants: Annotated[
        str, typer.Option(help="Comma-separated configs (packaged names or YAML paths); the first is "
                          "the reference of the paired tests.")
    ] = "baseline",
    profile: Annotated[
        str, typer.Option(help="quick (2 CPU cores, < 1 h for the baseline), medium (home + 2 away sites, "
                          "case-limited budget), full (GPU, nnU-Net-like budget) or a profile YAML.")
    ] = "quick",
    test_size: Annotated[
        int | None, typer.Option(help="Cases of --data held out for testing (default: half); with the "
                                 "embedded cohort, how many of its home test cases to use.")
    ] = None,
    away: Annotated[
        list[Path] | None,
        typer.Option(help="Labelled folder of another site: one more test set, never trained on "
                     "(repeatable; the profile may add embedded away sites)."),
    ] = None,
    adapt: Annotated[
        str | None,
        typer.Option(help="Comma-separated VARIANT@SITE: also run VARIANT with that away site's "
                     "unlabelled scans (adapting to a new hospital), e.g. sim2real@site-b."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Extra config override for every run, e.g. --set train.steps=100."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    cache_dir: Annotated[
        Path | None, typer.Option(help="Cache for the embedded cohort (default ~/.cache/menseg).")
    ] = None,
    report_only: Annotated[
        bool, typer.Option(help="Write the report from the runs finished so far; train nothing (also "
                           "beside a benchmark still running in OUT).")
    ] = False,
) -> None:
    """Quality vs number of labelled cases: every (variant, N, seed) on one budget, scored on every
    test set (home and away sites).

    Writes OUT/report/ (report.html, report.md, results.csv, figures). Interrupted? Run the
    same command again: finished runs are kept, an unfinished one resumes from its checkpoint.
    OUT is a results folder: commit it (its .gitignore leaves out checkpoints and predictions)
    and the same command continues it on another machine, training only what is missing.
    """
    from menseg.bench.efficiency import run_efficiency

    files = run_efficiency(
        out, [v.strip() for v in variants.split(",") if v.strip()],
        _int_list(labeled, "--labeled") if labeled is not None else None, seeds, profile, data, unlabeled,
        test_size, set_ or [], device, cache_dir, command=" ".join(["menseg", *sys.argv[1:]]),
        away=away or [], adapt=[a.strip() for a in (adapt or "").split(",") if a.strip()],
        report_only=report_only,
    )
    for name in ("report.html", "report.md", "results.csv"):
        if name in files:
            typer.echo(str(files[name]))


@bench_app.command("missing")
def bench_missing(
    out: Annotated[Path, typer.Option(help="A data-efficiency benchmark folder (menseg bench efficiency).")],
    variants: Annotated[str, typer.Option(help="Comma-separated variants to test.")] = "baseline,ism-modal",
    labeled: Annotated[
        int | None, typer.Option(help="Which N's runs (default: the largest finished).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    subsets: Annotated[
        str, typer.Option(help="single: each sequence dropped alone (5 conditions); all: predicted from each "
                          "of the 15 non-empty subsets.")
    ] = "single",
    cases: Annotated[
        int | None, typer.Option(help="Use only the first K home test cases (default: all).")
    ] = None,
) -> None:
    """Lesion-wise Dice with MRI sequences dropped at prediction, per variant (sequence dropout, modal
    fusion, neither).

    Writes OUT/missing/ (or OUT/subsets/ with --subsets all): missing.csv and missing.md, and prints the
    table.
    """
    from menseg.bench.ism import run_missing

    folder = run_missing(out, [v.strip() for v in variants.split(",") if v.strip()], labeled, device,
                         subsets=subsets, max_cases=cases)
    typer.echo((folder / "missing.md").read_text())


@bench_app.command("longitudinal")
def bench_longitudinal(
    out: Annotated[
        Path, typer.Option(help="Folder for the cohort, the run and the results (resumable).")
    ] = Path("menseg-bench-longitudinal"),
    variant: Annotated[str, typer.Option(help="Config to train (packaged name or YAML).")] = "ism",
    profile: Annotated[str, typer.Option(help="Budget profile (quick, full or a YAML).")] = "quick",
    train_patients: Annotated[int, typer.Option(help="Training patients (all visits labelled).")] = 6,
    test_patients: Annotated[int, typer.Option(help="Test patients (last visit scored).")] = 6,
    visits: Annotated[int, typer.Option(help="Visits per patient.")] = 3,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Extra config override, e.g. --set train.steps=100."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Last-visit Dice with and without the previous visit as --prior, on a synthetic longitudinal cohort."""
    from menseg.bench.ism import LongitudinalSpec, longitudinal_table, run_longitudinal

    if min(train_patients, test_patients) < 1 or visits < 2:
        raise MensegError("need at least 1 training and 1 test patient and 2 visits per patient")
    spec = LongitudinalSpec(n_train=train_patients, n_test=test_patients, visits=visits)
    summary = run_longitudinal(out, variant, profile, spec, set_ or [], device)
    typer.echo(longitudinal_table(summary, variant))


def _spacing(value: float) -> tuple[float, float, float]:
    if not value > 0:
        raise MensegError(f"--spacing must be > 0 mm, got {value}")
    return (float(value),) * 3


@sim2real_app.command("fit-translator")
def sim2real_fit(
    synthetic: Annotated[Path, typer.Option(help="Labelled synthetic cases (e.g. `menseg synth` output).")],
    real: Annotated[Path, typer.Option(help="Real scans, labels not needed (BraTS or nnU-Net layout).")],
    out: Annotated[Path, typer.Option(help="New folder for the translator (or one to --resume).")],
    spacing: Annotated[float, typer.Option(help="Isotropic grid (mm) both sets are resampled to.")] = 2.0,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and the patch draws.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/latest.pt.")] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Translator setting, e.g. --set steps=2000 (sim2real.translator keys)."),
    ] = None,
) -> None:
    """Fit the cycle-consistent sim->real translator (lesion kept by a semantic term); writes
    OUT/translator.pt, metrics.jsonl and before/after previews in OUT/preview/."""
    from menseg.config import load_config

    cfg = load_config(None, [f"sim2real.translator.{x}" for x in set_ or []]).sim2real.translator
    from menseg.sim2real.translator import fit_translator_from_folders

    path = fit_translator_from_folders(synthetic, real, out, cfg, spacing=_spacing(spacing), seed=seed,
                                       device=device, resume=resume)
    typer.echo(f"translator: {path}")


@sim2real_app.command("translate")
def sim2real_translate(
    translator: Annotated[Path, typer.Argument(help="translator.pt or the fit-translator folder.")],
    src: Annotated[Path, typer.Argument(help="Dataset to translate (BraTS or nnU-Net layout).")],
    out: Annotated[Path, typer.Argument(help="New folder: the translated cases, BraTS layout.")],
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "cpu",
) -> None:
    """Translate a (synthetic) dataset to the real scans' appearance; labels are copied unchanged."""
    from menseg.sim2real.translator import translate_dataset

    ids = translate_dataset(translator, src, out, device=device)
    typer.echo(f"{len(ids)} case(s) written to {out}")


@sim2real_app.command("gap")
def sim2real_gap(
    real: Annotated[Path, typer.Option(help="Real scans (BraTS or nnU-Net layout).")],
    synthetic: Annotated[Path, typer.Option(help="Synthetic cases.")],
    translator: Annotated[
        Path | None, typer.Option(help="Also measure the translated synthetic cases.")] = None,
    spacing: Annotated[float, typer.Option(help="Isotropic grid (mm) for the comparison.")] = 2.0,
    seed: Annotated[int, typer.Option(help="Seed of the domain classifier.")] = 0,
    steps: Annotated[int, typer.Option(help="Training steps of the domain classifier.")] = 150,
    patch: Annotated[int, typer.Option(help="Classifier patch edge (voxels).")] = 32,
    away_from_lesions: Annotated[bool, typer.Option(
        "--away-from-lesions/--with-lesions",
        help="Leave lesions out of every set (bright FLAIR / T1c regions of at least 1 cm3 and known "
             "labels, with a 4 mm margin): patches hold no lesion voxel, so the gap is the anatomy's "
             "and the scanner's.")] = True,
    out: Annotated[Path | None, typer.Option(help="Also write the table here (markdown).")] = None,
) -> None:
    """How far synthetic (raw, and translated) scans are from real ones: a domain classifier's
    held-out accuracy and AUC (0.5 = indistinguishable) and per-tissue intensity distances."""
    import tempfile

    from menseg.data.dataset import preprocess_dataset
    from menseg.data.layouts import discover_cases
    from menseg.sim2real.gap import domain_gap, gap_table
    from menseg.sim2real.translator import load_translator, translate_image

    sp = _spacing(spacing)
    with tempfile.TemporaryDirectory() as tmp:
        real_img = [c.image for c in preprocess_dataset(discover_cases(real), Path(tmp) / "r", sp)]
        syn = preprocess_dataset(discover_cases(synthetic), Path(tmp) / "s", sp)
        syn_img = [c.image for c in syn]
        syn_lab = [c.label for c in syn]
        sets = {"raw synthetic": syn_img}
        if translator is not None:
            gen = load_translator(translator)
            sets["translated"] = [translate_image(gen, img) for img in syn_img]
        table = gap_table(domain_gap(real_img, sets, seed=seed, steps=steps, patch=(patch,) * 3,
                                     away_from_lesions=away_from_lesions, spacing_mm=spacing,
                                     labels={k: syn_lab for k in sets}))
    typer.echo(table)
    if out is not None:
        from menseg.utils import write_text_atomic

        write_text_atomic(out, table + "\n")


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option(help="Folder for the demo data, run and results.")] = Path(
        "menseg-demo"
    ),
    steps: Annotated[int | None, typer.Option(help="Training steps (default from demo config).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing demo folder.")] = False,
) -> None:
    """Synthesise a small one-site cohort, train, predict the held-out cases, evaluate."""
    from menseg.demo import run_demo

    summary = run_demo(out, steps=steps, overwrite=overwrite)
    _print_summary(summary)


def main() -> None:
    """Console entry point: one-line errors unless --debug."""
    debug = "--debug" in sys.argv[1:]
    try:
        app()
    except MensegError as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - a CLI must not dump tracebacks on users
        if debug:
            raise
        from menseg.utils import context_from_env

        run = context_from_env()
        if not run.main and "Connection" in str(e):
            typer.echo(f"error: [rank {run.rank}] stopped: another process of the run failed "
                       "(its error is shown above or below)", err=True)
            raise SystemExit(1) from None
        typer.echo(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                   err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
