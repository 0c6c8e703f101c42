"""What `bnnify fit` shows: a line per epoch on stderr, the kept epoch's summary on stdout."""

from __future__ import annotations

from pathlib import Path

from bnnify.cli.output import Output

__all__ = ["log_epoch", "render"]


def log_epoch(out: Output, record: dict, epochs: int) -> None:
    """One epoch's line on stderr (every tenth of the epochs, or all with --verbose)."""
    val = record.get("val") or {}
    parts = [] if "point" not in record else [f"point {record['point'] + 1}"]
    parts += [
        f"epoch {record['epoch']}",
        f"ELBO/N {record['elbo']:.4g}",
        f"NLL {record['nll']:.4g}",
        f"KL {record['kl']:.4g}",
    ]
    parts += [f"val {k} {v:.4g}" for k, v in val.items()]
    if record.get("improved"):
        parts.append("(best so far)")
    every = max(1, epochs // 10)
    if out.verbose or record["epoch"] % every == 0:
        out.log("  ".join(parts))


def render(out: Output, info: dict, destination: Path) -> None:
    """The summary on stdout: the epoch kept and why, its metrics, the search's best."""
    kept, selection = info["kept"], info["selection"]
    out.line(
        f"Fitted {info['n_train']} examples for {info['epochs_run']} epochs; kept epoch "
        f"{selection['kept_epoch']} ({selection['reason']})"
    )
    if "elbo" in kept:
        out.line(
            f"  kept epoch: ELBO/N {kept['elbo']:.5g}, NLL {kept['nll']:.5g}, KL {kept['kl']:.5g}"
            + (f", noise {kept['noise']:.4g}" if "noise" in kept else "")
        )
    for key, value in (kept.get("val") or {}).items():
        out.line(f"  validation {key}: {value:.5g}")
    if info.get("val_estimator"):
        out.line("  validation estimator: {estimator} ({reason})".format(**info["val_estimator"]))
    if info.get("search"):
        search = info["search"]
        best = search["points"][search["best"]]
        out.line(
            f"  search: best of {len(search['points'])} points: prior scale "
            f"{best['prior_scale']:g}, posterior delta {best['posterior_delta']:g}, KL weight "
            f"{best['kl_weight']:g}"
        )
    out.line(f"  wrote {destination}")
