"""The options of the commands, declared once (`Annotated` aliases), shared ones first."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnnify.cli.export_options import (
    AleatoricOpt,
    AnyCheckpointArg,
    DefaultTaskOpt,
    ExportFlagOpt,
    ExportFormatOpt,
    ExportInputOpt,
    ExportOutOpt,
    ExportSeedOpt,
    KeepOpt,
    OptionalModelOpt,
    PruneDataOpt,
    PruneOutOpt,
    SamplesOpt,
    ScopeOpt,
    SnrThresholdOpt,
    TargetsOpt,
    WeightsOpt,
)
from bnnify.enums import NoiseMode, Task

__all__ = [
    "AleatoricOpt",
    "AnyCheckpointArg",
    "ArchKwargsOpt",
    "ArchOpt",
    "BatchSizeOpt",
    "CheckpointArg",
    "CheckpointOutOpt",
    "ClassDimOpt",
    "ClipOpt",
    "ConvertSeedOpt",
    "DataOpt",
    "DefaultTaskOpt",
    "DeviceOpt",
    "DryRunOpt",
    "DtypeOpt",
    "EpochsOpt",
    "ExcludeOpt",
    "ExportFlagOpt",
    "ExportFormatOpt",
    "ExportInputOpt",
    "ExportOutOpt",
    "ExportSeedOpt",
    "FilterOpt",
    "FitOutOpt",
    "FitSamplesOpt",
    "FitTaskOpt",
    "FitVerboseOpt",
    "ForceOpt",
    "IncludeOpt",
    "InputKeyOpt",
    "JsonOpt",
    "KeepOpt",
    "KeyOpt",
    "KlWeightOpt",
    "LrOpt",
    "McSamplesOpt",
    "ModelArg",
    "ModelArgOpt",
    "ModelOpt",
    "NoCalibrationOpt",
    "NoiseOpt",
    "OnlyOpt",
    "OptionalModelOpt",
    "PatienceOpt",
    "PosteriorArgOpt",
    "PosteriorOpt",
    "PredictOutOpt",
    "PriorArgOpt",
    "PriorOpt",
    "PruneDataOpt",
    "PruneOutOpt",
    "QuietOpt",
    "ReportOpt",
    "ResumeOpt",
    "SamplesOpt",
    "ScopeOpt",
    "SearchOpt",
    "SeedOpt",
    "ShardSizeOpt",
    "SkipOpt",
    "SnrThresholdOpt",
    "SpecOpt",
    "TargetOpt",
    "TargetsOpt",
    "TopOpt",
    "TrustPickleOpt",
    "ValOpt",
    "ValSamplesOpt",
    "ValSplitOpt",
    "VerboseOpt",
    "WarmupOpt",
    "WeightsOpt",
    "XKeyOpt",
    "YKeyOpt",
]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
_QUIET = "No logs, warnings or summary: only errors (and --json's JSON)."
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help=_QUIET)]
VerboseOpt = Annotated[
    bool,
    typer.Option("--verbose", "-v", help="Show the per-parameter table (see --top and --filter)."),
]
FilterOpt = Annotated[
    str | None,
    typer.Option(
        "--filter",
        help="Only the parameters whose name matches this glob (e.g. 'layers.1*.weight').",
    ),
]
TopOpt = Annotated[
    int, typer.Option("--top", min=0, help="Rows of the per-parameter table (0: all).")
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing output files.")]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="Device to compute on: cpu, cuda, cuda:1, ...")
]
PriorOpt = Annotated[
    str | None,
    typer.Option("--prior", help="Prior name (see `bnnify list`); overrides the spec."),
]
PriorArgOpt = Annotated[
    list[str] | None,
    typer.Option("--prior-arg", help="Prior argument key=value (repeatable), e.g. sigma=0.1."),
]
McSamplesOpt = Annotated[
    int | None,
    typer.Option(
        "--mc-samples",
        min=1,
        help="Monte Carlo samples per element for the KL (default: closed form when known, "
        "else 16).",
    ),
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Load a pickled nn.Module. Unpickling runs arbitrary code: only for files you trust.",
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="For a state-dict model: confirm the architecture the spec or checkpoint "
        "names (package.module : callable); building it runs that code.",
    ),
]
ArchKwargsOpt = Annotated[
    str | None,
    typer.Option(
        "--arch-kwargs",
        help="Confirm its arch_kwargs too, as a JSON object (e.g. '{\"hidden\": 32}'); "
        "needed when it has any.",
    ),
]
ModelOpt = Annotated[
    Path, typer.Option("--model", "-m", help="The model file the checkpoint was converted from.")
]

# ------------------------------------------------------------------ convert

ModelArg = Annotated[
    Path,
    typer.Argument(
        help="Model file (TorchScript, torch.export, state dict or training checkpoint, "
        "safetensors), sharded checkpoint index, or Hugging Face folder."
    ),
]
SpecOpt = Annotated[Path | None, typer.Option("--spec", "-c", help="YAML conversion spec.")]
PosteriorOpt = Annotated[
    str | None,
    typer.Option(
        help="Posterior name; default pretrained_gaussian (mu = the trained "
        "weights, sigma = 0.1 |w|)."
    ),
]
PosteriorArgOpt = Annotated[
    list[str] | None, typer.Option("--posterior-arg", help="Posterior argument key=value.")
]
DtypeOpt = Annotated[
    str | None, typer.Option(help="float32, float64, float16 or bfloat16 (default: keep).")
]
IncludeOpt = Annotated[
    list[str] | None, typer.Option(help="Glob of parameter names to make Bayesian.")
]
ExcludeOpt = Annotated[
    list[str] | None, typer.Option(help="Glob of parameter names to keep deterministic.")
]
OnlyOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="Module kinds to make Bayesian, e.g. linear,conv (kinds: linear, conv, norm, "
        "embedding, rnn, attention, other). Needs known module types (not a bare state dict).",
    ),
]
SkipOpt = Annotated[
    list[str] | None,
    typer.Option(help="Module kinds to keep deterministic, e.g. norm,embedding (as --only)."),
]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        help="In a torch.save checkpoint dict, the state dict's dotted key (e.g. "
        "model.state_dict, ema); default: found in common layouts."
    ),
]
ConvertSeedOpt = Annotated[int | None, typer.Option(min=0, help="Random seed (default 0).")]
CheckpointOutOpt = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Checkpoint path [default: <stem>.bnn.safetensors]."),
]
ReportOpt = Annotated[
    Path | None, typer.Option(help="KL report path [default: <stem>.kl.safetensors].")
]
_DRY_RUN = "Print the parameter plan and the KL divergence; write nothing."
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help=_DRY_RUN)]
ShardSizeOpt = Annotated[
    str | None,
    typer.Option(
        help="Write a sharded checkpoint with shards up to this size (e.g. 2GB); "
        "default for sharded inputs: their largest shard."
    ),
]

# ---------------------------------------------------------------- fit, predict

CheckpointArg = Annotated[Path, typer.Argument(help="Variational checkpoint to fit.")]
DataOpt = Annotated[
    Path, typer.Option("--data", "-d", help="Training data: safetensors (x, y), .npz, CSV.")
]
FitTaskOpt = Annotated[
    Task | None,
    typer.Option(
        help="regression (Gaussian likelihood, learned noise) or classification "
        "(logits). Default: the task of a resumed fit."
    ),
]
ValOpt = Annotated[Path | None, typer.Option(help="Validation data file.")]
ValSplitOpt = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        max=0.9,
        help="Fraction of the data held out for validation instead of --val [default: 0.1 "
        "of data of 10 examples or more]; 0: no validation, the last epoch is kept.",
    ),
]
PatienceOpt = Annotated[
    int,
    typer.Option(
        min=0,
        help="Stop after this many epochs without a better validation log-likelihood "
        "(0: run every epoch). The best epoch is kept either way.",
    ),
]
SearchOpt = Annotated[
    bool,
    typer.Option(
        "--search",
        help="Fit a small grid (prior scale, initial posterior spread, KL weight) and keep "
        "the best on validation data; the grid's results go into the checkpoint.",
    ),
]
EpochsOpt = Annotated[int, typer.Option(min=1, help="Passes over the training data.")]
LrOpt = Annotated[float, typer.Option(min=0.0, help="Adam learning rate.")]
BatchSizeOpt = Annotated[
    int, typer.Option(min=1, help="Examples per batch (per optimisation step; bounds memory).")
]
FitSamplesOpt = Annotated[
    int, typer.Option(min=1, help="Weight samples per step for the expected NLL.")
]
KlWeightOpt = Annotated[
    float, typer.Option(min=0.0, help="Multiplies KL / N (1: the true ELBO; README: defaults).")
]
WarmupOpt = Annotated[
    int, typer.Option(min=0, help="Linear KL warm-up from 0 over this many epochs.")
]
ClipOpt = Annotated[float, typer.Option(min=0.0, help="Gradient norm clipping (0: off).")]
SeedOpt = Annotated[
    int, typer.Option(min=0, max=2**31 - 1, help="Seed of the weight noise and the batches.")
]
FitVerboseOpt = Annotated[
    bool,
    typer.Option("--verbose", "-v", help="Log every epoch (default: about ten epoch lines)."),
]
NoiseOpt = Annotated[
    NoiseMode,
    typer.Option(
        help="Weight noise of each training step: fresh normals, or one reused buffer "
        "under a random shift and signs (cheaper; see README)."
    ),
]
ValSamplesOpt = Annotated[int, typer.Option(min=1, help="Weight samples for validation metrics.")]
InputKeyOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-key",
        "--x-key",
        help="Input tensor name in the data file (default: x); repeat for a model with "
        "several inputs (each goes to forward's parameter of its name, else in order); "
        "ARG=NAME passes tensor NAME as forward's ARG.",
    ),
]
ModelArgOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model-arg",
        help="Constant argument of the model's forward, NAME=VALUE (repeatable), e.g. "
        "sr=16000; the value is a number, boolean or string.",
    ),
]
ClassDimOpt = Annotated[
    int | None,
    typer.Option(
        help="Classification: the dimension of the classes in the model's output "
        "(default: the last, -1; 1 for (batch, classes, H, W) segmentation).",
    ),
]
XKeyOpt = Annotated[
    str,
    typer.Option("--input-key", "--x-key", help="Input tensor name in the data file."),
]
YKeyOpt = Annotated[str, typer.Option(help="Target tensor name in the data file.")]
TargetOpt = Annotated[
    str | None, typer.Option(help="CSV target column (name or index; default: last).")
]
FitOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Fitted checkpoint [default: the checkpoint's stem + .fit.safetensors].",
    ),
]
ResumeOpt = Annotated[
    bool,
    typer.Option("--resume", help="Continue a previous fit (its noise scale, history, task)."),
]

_PREDICT_OUT = (
    "Write the predictions: FILE.safetensors (every tensor, with metadata), FILE.csv (a row "
    "per example), or - for CSV on stdout (the summary then goes to stderr)."
)
PredictOutOpt = Annotated[
    str | None, typer.Option("--out", "-o", metavar="FILE", help=_PREDICT_OUT)
]

# ---------------------------------------------------------------- predict

OodOpt = Annotated[
    Path | None,
    typer.Option(
        "--ood",
        help="Out-of-distribution inputs (classification): report the AUROC and AUPR "
        "of entropy, mutual information and max softmax at telling them apart.",
    ),
]
NoCalibrationOpt = Annotated[
    bool, typer.Option("--no-calibration", help="Do not apply the checkpoint's calibration.")
]
KeepInputsOpt = Annotated[
    bool,
    typer.Option(
        "--keep-inputs", help="Also store the inputs in --out (for `bnnify plot`'s 1-D bands)."
    ),
]
