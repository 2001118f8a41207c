"""``fmrilm corpus``: build the descriptor corpus of a folder of ROI time series."""

from __future__ import annotations

from pathlib import Path

import click

from .corpus import build_corpus_from_dir
from .reference import load_reference


def _split(values: tuple[str, ...]) -> list[str]:
    out = []
    for v in values:
        out.extend(p for p in v.replace(",", " ").split() if p)
    return out


@click.command("corpus")
@click.argument("input_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_jsonl", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--reference", "reference_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Reference JSON to z-score against (default: built from the runs).")
@click.option("--save-reference", "save_reference_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the reference used to this JSON file.")
@click.option("--reference-sites", default=None,
              help="Comma-separated sites (participants.tsv 'site') whose runs build the reference.")
@click.option("--nprocs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes for the feature pass.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the text phrasing.")
@click.option("--participant-label", multiple=True,
              help="Subjects to include (with or without 'sub-'); repeat or separate by commas.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def corpus_command(input_dir, out_jsonl, reference_path, save_reference_path, reference_sites, nprocs, seed,
                   participant_label, quiet):
    """Turn the ROI time series under INPUT_DIR into descriptor lines in OUT_JSONL.

    One JSON line per run with features, robust z-scores against a reference population,
    categorical levels and a text description. Runs already in OUT_JSONL are skipped (resume).
    """
    if reference_path and reference_sites:
        raise click.UsageError("--reference and --reference-sites are mutually exclusive")
    reference = load_reference(reference_path) if reference_path else None
    sites = _split((reference_sites,)) if reference_sites else None
    try:
        res = build_corpus_from_dir(
            input_dir, out_jsonl, reference=reference, reference_sites=sites,
            save_reference_to=save_reference_path, nprocs=nprocs, seed=seed,
            participant_label=_split(participant_label) or None, progress=not quiet,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"{out_jsonl}: {res['written']} runs written, {res['skipped']} already present, "
        f"{len(res['failed'])} failed; reference {res['reference']['name']} ({res['reference']['id']}, "
        f"n={res['reference']['n_runs']})"
    )
    for path, err in res["failed"]:
        click.echo(f"  failed: {path}: {err}", err=True)
