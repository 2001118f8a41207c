"""Command lines: ``bids_fmrilm`` (the BIDS-App) and ``fmrilm`` (the training toolkit).

``bids_fmrilm BIDS_DIR OUTPUT_DIR {participant,group}`` follows the BIDS-Apps execution spec:
exit 0 on success, 16 when validation fails, 18 when the filters select nothing, 64 for usage
errors, 65 for malformed data, 66 for missing input, 73 when the output cannot be created, 74 for
I/O errors, 1 otherwise. Errors print one line; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import click

from . import __version__
from .config import Config, SignalSettings
from .errors import BidsAppError, ExitCode

log = logging.getLogger("bids_fmrilm")

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 unexpected error; 16 BIDS validation failed; 18 filters selected nothing; "
    "64 usage error; 65 malformed input data; 66 missing input; 73 output cannot be created; 74 I/O error."
)


def _setup_logging(debug: bool) -> None:
    from rich.logging import RichHandler

    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(show_time=False, show_path=debug, markup=False, rich_tracebacks=debug,
                                               console=__import__("rich.console").console.Console(stderr=True))
    else:  # logs to files or pipes: one line per message, never wrapped
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler], force=True)
    for noisy in ("bids", "bidsschematools", "nilearn", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not debug:
        import warnings

        warnings.filterwarnings("ignore")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
               epilog=EXIT_CODES_HELP)
@click.argument("bids_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.argument("analysis_level", type=click.Choice(["participant", "group"]))
@click.option("--participant-label", "--participant_label", multiple=True, metavar="LABEL",
              help="Participant(s) to process, with or without 'sub-'; repeat or space-separate. Default: all.")
@click.option("--session-label", multiple=True, metavar="LABEL", help="Session(s) to process ('ses-' optional).")
@click.option("--task", multiple=True, metavar="TASK", help="Task(s) to process.")
@click.option("--bids-filter-file", type=click.Path(path_type=Path), metavar="FILE",
              help="JSON of pybids entity filters, e.g. {\"bold\": {\"session\": \"1\"}}.")
@click.option("--derivatives", multiple=True, type=click.Path(path_type=Path), metavar="DIR",
              help="Derivatives dataset(s) with preprocessed BOLD (fMRIPrep output).")
@click.option("--atlas", default="seitzman300", show_default=True,
              help="Atlas name (seitzman300, power264, dosenbach160, schaefer400tian, schaefer100tian) or path to a NIfTI label image.")
@click.option("--target-tr", type=float, default=2.0, show_default=True, help="Model repetition time (s) series are resampled to.")
@click.option("--model", metavar="DIR",
              help="fMRI-LM checkpoint folder (fmrilm.json), a tokenizer folder (tokens only), 'default' (the packaged "
                   "model; also when unset, unless $BIDS_FMRILM_MODEL says otherwise) or 'none' (no model outputs).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--quantization", type=click.Choice(["auto", "4bit", "8bit", "none"]), default="auto", show_default=True)
@click.option("-w", "--work-dir", type=click.Path(path_type=Path), help="Folder for intermediate files.")
@click.option("--nprocs", "--n-cpus", type=click.IntRange(1), default=1, show_default=True, help="Runs processed in parallel.")
@click.option("--skip-bids-validation", "--skip_bids_validation", is_flag=True, help="Do not validate the input dataset.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--force", is_flag=True, help="Recompute runs whose outputs are already complete.")
@click.option("--label", help="Group level: participants.tsv column to predict with cross-validation.")
@click.option("--labels-file", type=click.Path(path_type=Path), help="Group level: TSV with participant_id and the label column (default: BIDS_DIR/participants.tsv).")
@click.option("--task-type", type=click.Choice(["auto", "classification", "regression"]), default="auto", show_default=True)
@click.option("--cv-group", metavar="COLUMN", help="Group level: hold out whole groups of this column (e.g. site).")
@click.option("--folds", type=click.IntRange(2), default=5, show_default=True, help="Group level: cross-validation folds.")
@click.option("--shots", multiple=True, metavar="K",
              help="Group level: participants per class for few-shot LoRA adaptation, one value per point of the "
                   "learning curve ('all' = every training participant); the last value trains the saved adapter. "
                   "Default: 8 32 all.")
@click.option("--adapt-steps", type=click.IntRange(1), default=20, show_default=True,
              help="Group level: LoRA optimisation steps per few-shot adaptation.")
@click.option("--adapt-validation", type=click.FloatRange(0.0, 0.5), default=0.25, show_default=True,
              metavar="SHARE",
              help="Group level: share of the few-shot participants held out for early stopping (the adapter weights "
                   "with the lowest held-out loss are kept, the unadapted checkpoint included); 0 turns it off.")
@click.option("--adapter", type=click.Path(path_type=Path), metavar="DIR",
              help="Participant level: a group-level adapter (group/label-<L>_adapter) whose label is predicted "
                   "beside the checkpoint's tasks.")
@click.option("--descriptor-reference", type=click.Path(path_type=Path), metavar="JSON",
              help="Normative reference for descriptor z-scores (from fmrilm corpus --save-reference); default: the packaged ABIDE reference.")
@click.option("--preproc", type=click.Choice(["auto", "minimal", "none"]), default="auto", show_default=True,
              help="Raw scanner-space BOLD: 'auto' uses fMRIPrep output when found, else runs the minimal ANTsPy "
                   "pipeline (motion, registration to MNI, confounds); 'minimal' runs the minimal pipeline on raw runs even "
                   "where fMRIPrep output exists; 'none' refuses raw scanner-space runs (exit 66). "
                   "fMRIPrep first is recommended.")
@click.option("--save-preproc", is_flag=True, help="Also write the preprocessed BOLD series of raw runs (MNI, 2 mm).")
@click.option("--omp-nthreads", type=click.IntRange(0), default=0, show_default=True,
              help="Threads per run for ANTs/ITK (0: CPUs divided by --nprocs).")
@click.option("--debug", is_flag=True, help="Verbose logging and tracebacks.")
@click.version_option(__version__, "-v", "--version", prog_name="bids_fmrilm")
def bids_app_command(**kw) -> int:
    """BIDS-App: fMRI-LM derivatives (ROI time series, ...) for every BOLD run of BIDS_DIR.

    BIDS_DIR is a raw BIDS dataset, fMRIPrep derivatives in MNI space, or ROI time-series
    derivatives (C-PAC/XCP-D style). OUTPUT_DIR receives BIDS-Derivatives. ANALYSIS_LEVEL is
    'participant' (per run) or 'group' (summaries over what the participant level wrote).
    """
    from .bids.layout import load_filters
    from .model.checkpoint import resolve_model

    _setup_logging(kw["debug"])
    labels = tuple(x for v in kw["participant_label"] for x in v.split())
    cfg = Config(
        bids_dir=kw["bids_dir"],
        output_dir=kw["output_dir"],
        analysis_level=kw["analysis_level"],
        participant_label=labels,
        session_label=tuple(x for v in kw["session_label"] for x in v.split()),
        task=tuple(x for v in kw["task"] for x in v.split()),
        bids_filters=load_filters(kw["bids_filter_file"]),
        derivatives=tuple(kw["derivatives"]),
        model=resolve_model(kw["model"]),
        device=kw["device"],
        quantization=kw["quantization"],
        work_dir=kw["work_dir"],
        nprocs=kw["nprocs"],
        skip_bids_validation=kw["skip_bids_validation"],
        seed=kw["seed"],
        force=kw["force"],
        label=kw["label"],
        labels_file=kw["labels_file"],
        task_type=kw["task_type"],
        cv_group=kw["cv_group"],
        folds=kw["folds"],
        shots=tuple(x for v in kw["shots"] for x in v.replace(",", " ").split()) or ("8", "32", "all"),
        adapt_steps=kw["adapt_steps"],
        adapt_validation=kw["adapt_validation"],
        adapter=kw["adapter"],
        debug=kw["debug"],
        descriptor_reference=kw["descriptor_reference"],
        signals=SignalSettings(atlas=kw["atlas"], target_tr=kw["target_tr"]),
        preproc=kw["preproc"],
        save_preproc=kw["save_preproc"],
        omp_nthreads=kw["omp_nthreads"],
    )
    # ITK reads its thread count once, when it first starts threads: set it before any ANTs call
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(cfg.threads_per_run())
    if cfg.analysis_level == "participant":
        from .levels.participant import exit_code, run_participant

        results = run_participant(cfg)
        _print_summary(results)
        return exit_code(results)
    from .levels.group import run_group

    run_group(cfg)
    return 0


def _print_summary(results) -> None:
    from rich.console import Console
    from rich.table import Table

    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    table = Table(title=f"bids_fmrilm: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed")
    for col in ("run", "status", "reason"):
        table.add_column(col)
    shown = [r for r in results if r.status == "failed"][:50] + [r for r in results if r.status != "failed"][:10]
    for r in shown:
        table.add_row(r.run_id, r.status, r.reason)
    if len(results) > len(shown):
        table.caption = f"{len(results) - len(shown)} more rows in logs/*_summary.tsv"
    Console(stderr=True).print(table)


def _run(command: click.Command, args: list[str] | None, prog: str) -> int:
    debug = "--debug" in (args if args is not None else sys.argv[1:])
    if not debug:
        import warnings

        warnings.filterwarnings("ignore")
    try:
        rv = command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help, --version
        return int(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except click.ClickException as exc:  # bad usage: click's own message, exit 64
        exc.show()
        return int(ExitCode.USAGE)
    except BidsAppError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"{prog}: error: {exc.one_line()}", err=True)
        return int(exc.code)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # anything unforeseen: one line, traceback with --debug
        if debug:
            traceback.print_exc()
        click.echo(f"{prog}: unexpected error: {exc.__class__.__name__}: {exc} (re-run with --debug for details)", err=True)
        return int(ExitCode.ERROR)
    return int(rv or 0)


MULTI_VALUE = ("--participant-label", "--participant_label", "--session-label", "--task", "--derivatives", "--shots")


def expand_multi_values(args: list[str]) -> list[str]:
    """Accept the BIDS-Apps form ``--participant-label 01 02`` (space-separated values).

    Values after a multi-value option are split off only once the three positional arguments
    have been given, so ``--participant-label 01 /data /out participant`` keeps its meaning.
    """
    out: list[str] = []
    positional = 0
    current = None
    takes_value = {o.opts[0] for o in bids_app_command.params if isinstance(o, click.Option) and not o.is_flag}
    takes_value |= {alias for o in bids_app_command.params if isinstance(o, click.Option) and not o.is_flag for alias in o.opts}
    i = 0
    while i < len(args):
        a = args[i]
        if a in MULTI_VALUE:
            current = a
            out += [a, args[i + 1]] if i + 1 < len(args) else [a]
            i += 2
            continue
        if a.startswith("-"):
            current = None
            out.append(a)
            if a in takes_value and "=" not in a and i + 1 < len(args):
                out.append(args[i + 1])
                i += 1
            i += 1
            continue
        if current is not None and positional >= 3:
            out += [current, a]
        else:
            current = None
            positional += 1
            out.append(a)
        i += 1
    return out


def bids_app(args: list[str] | None = None) -> None:
    """Console entry point of ``bids_fmrilm``."""
    args = expand_multi_values(list(sys.argv[1:] if args is None else args))
    sys.exit(_run(bids_app_command, args, "bids_fmrilm"))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-v", "--version", prog_name="fmrilm")
def toolkit_group() -> None:
    """fmrilm: build the descriptor corpus and train the fMRI-LM stages."""


def _register_toolkit() -> None:
    from .descriptors.cli import corpus_command
    from .model.compare import compare_models_command
    from .training.lm import evaluate_command, instruct_command, pretrain_command
    from .training.tokenizer import train_tokenizer_command

    toolkit_group.add_command(corpus_command, "corpus")
    toolkit_group.add_command(train_tokenizer_command, "train-tokenizer")
    toolkit_group.add_command(pretrain_command, "pretrain")
    toolkit_group.add_command(instruct_command, "instruct")
    toolkit_group.add_command(evaluate_command, "evaluate")
    toolkit_group.add_command(compare_models_command, "compare-models")


def toolkit(args: list[str] | None = None) -> None:
    """Console entry point of ``fmrilm``."""
    _register_toolkit()  # here, not at import: bids_fmrilm --version stays fast
    sys.exit(_run(toolkit_group, args, "fmrilm"))


if __name__ == "__main__":
    bids_app()
