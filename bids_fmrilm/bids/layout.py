"""Finding the runs to process in a BIDS dataset and its derivatives (pybids).

Three kinds of input are recognised (see DESIGN.md, "Inputs"):

``volume``
    Preprocessed BOLD in a standard space: fMRIPrep's
    ``*_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz`` (or ``MNI152NLin6Asym``), with the
    run's ``desc-confounds_timeseries.tsv`` and ``desc-brain_mask`` when present. A raw BOLD
    image whose header or sidecar says it is already in MNI space (``sform_code`` 4 or
    ``SpatialReference`` naming MNI) counts as well.
``roi``
    ROI time series derivatives (``*_atlas-<A>_timeseries.tsv[.gz]`` with ``RepetitionTime`` in
    the sidecar), as written by C-PAC or XCP-D.
``raw``
    BOLD in the scanner's space. fMRIPrep first is recommended (its output is preferred when
    found); otherwise ``--preproc auto`` runs the minimal pipeline of
    :mod:`bids_fmrilm.preprocessing` on it (with the participant's T1w, :func:`find_t1w`), and
    ``--preproc none`` refuses it with a clear message (exit 66).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib

from ..errors import DataError, MissingInputError, NothingSelectedError, UsageError

log = logging.getLogger("bids_fmrilm")

ENTITY_ORDER = [
    ("subject", "sub"),
    ("session", "ses"),
    ("task", "task"),
    ("acquisition", "acq"),
    ("ceagent", "ce"),
    ("reconstruction", "rec"),
    ("direction", "dir"),
    ("run", "run"),
    ("echo", "echo"),
    ("space", "space"),
    ("atlas", "atlas"),
    ("desc", "desc"),
]
"""BIDS entities carried from a source file to its derivatives, in filename order."""

MNI_SPACES = ("MNI152NLin2009cAsym", "MNI152NLin6Asym", "MNI152NLin2009cSym", "MNI152NLin6Sym", "MNI152Lin")


@dataclass
class Run:
    """One BOLD run (or ROI time-series file) to process.

    Attributes
    ----------
    kind : {"volume", "roi", "raw"}
    path : Path
        The image or TSV file.
    entities : dict
        BIDS entities (``subject``, ``session``, ``task``, ``run``, ``space``, ``atlas`` ...).
    metadata : dict
        Sidecar JSON metadata, BIDS inheritance applied.
    dataset : Path
        Root of the dataset the file belongs to.
    confounds, mask : Path or None
        fMRIPrep confounds TSV and brain mask of the run, when found.
    """

    kind: str
    path: Path
    entities: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    dataset: Path | None = None
    confounds: Path | None = None
    mask: Path | None = None
    metadata_error: str | None = None

    @property
    def subject(self) -> str:
        return str(self.entities["subject"])

    @property
    def space(self) -> str | None:
        return self.entities.get("space")

    def source_entities(self) -> dict[str, Any]:
        """Entities that name the run (no ``space``/``atlas``/``desc``)."""
        keep = {"subject", "session", "task", "acquisition", "ceagent", "reconstruction", "direction", "run", "echo"}
        return {k: v for k, v in self.entities.items() if k in keep and v is not None}

    @property
    def run_id(self) -> str:
        """Short BIDS-style id, e.g. ``sub-01_ses-1_task-rest_run-1``."""
        return "_".join(f"{short}-{self.entities[long]}" for long, short in ENTITY_ORDER
                        if long in self.source_entities())

    def relpath(self) -> str:
        try:
            return str(self.path.relative_to(self.dataset)) if self.dataset else str(self.path)
        except ValueError:
            return str(self.path)


def strip_prefix(label: str, prefix: str) -> str:
    """``sub-01`` and ``01`` both give ``01``."""
    label = str(label).strip()
    return label[len(prefix) + 1 :] if label.startswith(prefix + "-") else label


def read_dataset_description(root: Path) -> dict[str, Any]:
    """Read ``dataset_description.json``; a clear error when it is missing or malformed."""
    dd = Path(root) / "dataset_description.json"
    if not dd.is_file():
        raise MissingInputError(
            "not a BIDS dataset (no dataset_description.json)",
            path=root,
            fix="point BIDS_DIR at the dataset root, the folder that holds dataset_description.json",
        )
    try:
        desc = json.loads(dd.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise DataError(f"malformed JSON ({exc.__class__.__name__}: {exc})", path=dd, fix="make it valid JSON") from None
    except OSError as exc:
        raise MissingInputError(f"cannot read ({exc.strerror or exc})", path=dd, fix="check the file is readable") from None
    if not isinstance(desc, dict):
        raise DataError(f"holds a JSON {type(desc).__name__}, not an object", path=dd,
                        fix='write a JSON object such as {"Name": "...", "BIDSVersion": "1.10.0"}')
    return desc


def read_sidecar(path: Path, root: Path) -> dict[str, Any]:
    """Sidecar metadata of a data file with the BIDS inheritance principle.

    JSON files from the dataset root down to the file's folder whose entities are a subset of the
    file's and whose suffix matches are merged, nearer files overriding farther ones.

    Raises
    ------
    DataError
        When an applicable JSON file is malformed.
    """
    name = path.name
    stem = re.sub(r"\.(nii(\.gz)?|tsv(\.gz)?|json)$", "", name)
    parts = stem.split("_")
    suffix = parts[-1]
    ents = set(parts[:-1])
    folders = []
    d = path.parent
    root = Path(root).resolve()
    while True:
        folders.append(d)
        if d.resolve() == root or d.parent == d:
            break
        d = d.parent
    meta: dict[str, Any] = {}
    for folder in reversed(folders):
        cands = []
        for js in folder.glob(f"*{suffix}.json"):
            jparts = js.name[: -len(".json")].split("_")
            if jparts[-1] != suffix or not set(jparts[:-1]) <= ents:
                continue
            cands.append((len(jparts), js))
        for _, js in sorted(cands):
            if not js.is_file():  # a folder or a broken link named like a sidecar
                continue
            try:
                obj = json.loads(js.read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
                raise DataError(f"malformed JSON sidecar ({exc.__class__.__name__}: {exc})", path=js,
                                fix="make it valid JSON") from None
            except OSError as exc:
                raise DataError(f"cannot read JSON sidecar ({exc.strerror or exc})", path=js,
                                fix="check the file is readable") from None
            if not isinstance(obj, dict):
                raise DataError(f"JSON sidecar holds a {type(obj).__name__}, not an object", path=js,
                                fix='make it a JSON object such as {"RepetitionTime": 2.0}')
            meta.update(obj)
    return meta


def _is_mni_image(path: Path, meta: dict[str, Any]) -> bool:
    ref = str(meta.get("SpatialReference", "")) + str(meta.get("Space", ""))
    if "MNI" in ref.upper():
        return True
    try:
        hdr = nib.load(path).header
        return int(hdr["sform_code"]) == 4 or int(hdr["qform_code"]) == 4
    except Exception:
        return False


def _shown(path: str) -> str:
    """A path printable whatever its bytes (undecodable bytes as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _unindexable(root: Path) -> list[str]:
    """Paths under ``root`` that pybids must not index, each reported with a warning.

    Symbolic links to a folder that contains them (``sub-01/func/loop -> ..``) would be indexed
    again and again until the system's link limit, and links to another indexed folder of the
    dataset (``func/x -> ../anat``, ``anat/y -> ../func``) would index its runs twice or loop;
    names that are not UTF-8 cannot be stored in pybids' database and would stop indexing of the
    whole dataset.
    """
    skip: list[str] = []
    top_ignored = {"derivatives", "sourcedata", "code", "models", "stimuli"}  # pybids does not index these
    real_root = os.path.realpath(root)

    def indexed_in_dataset(target: str) -> bool:
        if target != real_root and not target.startswith(real_root + os.sep):
            return False
        parts = Path(os.path.relpath(target, real_root)).parts
        return not any(x.startswith(".") for x in parts) and not (parts and parts[0] in top_ignored)

    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False: links are listed, not entered
        dirnames[:] = [d for d in dirnames if not d.startswith(".")
                       and not (dirpath == str(root) and d in top_ignored)]
        here = os.path.realpath(dirpath)
        for name in list(dirnames) + filenames:
            full = os.path.join(dirpath, name)
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                log.warning("%s: file name is not valid UTF-8; skipped. Fix: rename it with UTF-8 characters",
                            _shown(full))
                skip.append(full)
                continue
            if name in dirnames and os.path.islink(full):
                target = os.path.realpath(full)
                if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
                    log.warning("%s: symbolic link to a folder above it (a loop); skipped. Fix: remove the link",
                                _shown(full))
                    skip.append(full)
                elif indexed_in_dataset(target):
                    log.warning("%s: symbolic link to %s, a folder of the dataset indexed where it is; skipped. "
                                "Fix: remove the link", _shown(full), _shown(os.path.relpath(target, real_root)))
                    skip.append(full)
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip]
    return skip


def _layout(root: Path, derivative: bool):
    from bids.layout import BIDSLayout, BIDSLayoutIndexer
    from bids.layout.validation import DEFAULT_LOCATIONS_TO_IGNORE

    try:
        skip = _unindexable(root)
        ignore = None
        if skip:
            ignore = list(DEFAULT_LOCATIONS_TO_IGNORE) + [
                re.compile("^" + re.escape("/" + os.path.relpath(p, root)) + "(/|$)") for p in skip]
        # metadata is read per run (read_sidecar), so one malformed sidecar cannot stop indexing
        return BIDSLayout(root, validate=False, is_derivative=derivative,
                          indexer=BIDSLayoutIndexer(validate=False, index_metadata=False, ignore=ignore))
    except Exception as exc:
        raise DataError(f"pybids cannot index this dataset ({exc.__class__.__name__}: {exc})", path=root,
                        fix="check dataset_description.json and the file names") from None


def _entities(f) -> dict[str, Any]:
    ents = {k: v for k, v in f.get_entities().items() if k not in ("extension", "suffix", "datatype")}
    return ents


def load_filters(path: str | Path | None) -> dict[str, Any]:
    """Read a ``--bids-filter-file``: a JSON object of pybids queries.

    Both fMRIPrep's form (``{"bold": {"session": "1"}}``) and a flat entity query
    (``{"session": "1"}``) are accepted. Values may be strings, lists or null.
    """
    if path is None:
        return {}
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingInputError("filter file not found", path=p) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"filter file is not valid JSON ({exc})", path=p, fix="make it a JSON object") from None
    if not isinstance(data, dict):
        raise UsageError("filter file must hold a JSON object", path=p)
    for key in ("bold", "timeseries"):
        if isinstance(data.get(key), dict):
            return dict(data[key])
    return data


def _matches(value: Any, wanted: Any) -> bool:
    if wanted is None:
        return value is None
    if isinstance(wanted, list | tuple | set):
        return any(_matches(value, w) for w in wanted)
    if value is None:
        return False
    return str(value).lstrip("0") == str(wanted).lstrip("0") or str(value) == str(wanted)


def find_runs(
    bids_dir: str | Path,
    derivatives: tuple[str | Path, ...] = (),
    participant_label: tuple[str, ...] = (),
    session_label: tuple[str, ...] = (),
    task: tuple[str, ...] = (),
    filters: dict[str, Any] | None = None,
    prefer_raw: bool = False,
) -> list[Run]:
    """All runs of a dataset that the filters select, one :class:`Run` per BOLD run.

    Preprocessed runs in MNI space are preferred over the raw run they came from (unless
    ``prefer_raw``, for ``--preproc minimal``); ROI time-series files are taken as they are. Raw
    native-space runs are returned with ``kind="raw"`` so that the caller can preprocess or
    report them.

    Parameters
    ----------
    bids_dir : path
        BIDS dataset root (raw, or a derivatives dataset such as fMRIPrep or C-PAC output).
    derivatives : paths
        Further derivatives datasets (fMRIPrep output); ``bids_dir/derivatives/*`` are added.
    participant_label, session_label, task : tuples of str
        Selections; a ``sub-``/``ses-`` prefix is optional.
    filters : dict
        Extra entity filters (``--bids-filter-file``).

    Raises
    ------
    MissingInputError
        ``bids_dir`` is not a BIDS dataset.
    UsageError
        A participant label does not exist.
    NothingSelectedError
        The dataset has BOLD data but the filters select none.
    """
    root = Path(bids_dir).resolve()
    if not root.is_dir():
        raise MissingInputError("input folder does not exist", path=bids_dir, fix="give the dataset root")
    desc = read_dataset_description(root)
    is_deriv = str(desc.get("DatasetType", "raw")).lower() == "derivative"
    roots = [(root, is_deriv)]
    deriv_dirs = [Path(d).resolve() for d in derivatives]
    if (root / "derivatives").is_dir():
        deriv_dirs += [d for d in sorted((root / "derivatives").iterdir()) if (d / "dataset_description.json").is_file()]
    for d in deriv_dirs:
        if not (d / "dataset_description.json").is_file():
            raise MissingInputError("derivatives folder has no dataset_description.json", path=d,
                                    fix="pass the derivatives dataset root (fMRIPrep's output folder)")
        roots.append((d, True))

    found: list[Run] = []
    subjects_present: set[str] = set()
    for droot, deriv in roots:
        layout = _layout(droot, deriv)
        subjects_present.update(layout.get_subjects())
        for f in layout.get(suffix="bold", extension=[".nii", ".nii.gz"]):
            ents = _entities(f)
            path = Path(f.path)
            space = ents.get("space")
            if space is not None or ents.get("desc") == "preproc":
                if space and not str(space).startswith("MNI152"):
                    continue  # T1w or fsnative output of fMRIPrep: not used
                if ents.get("desc") not in (None, "preproc"):
                    continue
                kind = "volume"
            else:
                kind = "raw"
            found.append(Run(kind, path, ents, dataset=droot))
        for f in layout.get(suffix="timeseries", extension=[".tsv", ".tsv.gz"]):
            ents = _entities(f)
            if ents.get("desc") == "confounds" or "atlas" not in ents:
                continue
            found.append(Run("roi", Path(f.path), ents, dataset=droot))

    if not found:
        raise MissingInputError(
            "no BOLD runs (*_bold.nii[.gz]) or ROI time series (*_atlas-<A>_timeseries.tsv[.gz]) found",
            path=root,
            fix="check the dataset holds functional data under sub-*/func",
        )

    subs = tuple(strip_prefix(s, "sub") for s in participant_label)
    missing = [s for s in subs if s not in subjects_present]
    if missing:
        example = ", ".join(sorted(subjects_present)[:5])
        raise UsageError(f"participant label(s) {', '.join(missing)} not in the dataset", path=root,
                         fix=f"use labels that exist (e.g. {example})")
    query: dict[str, Any] = dict(filters or {})
    if subs:
        query["subject"] = list(subs)
    if session_label:
        query["session"] = [strip_prefix(s, "ses") for s in session_label]
    if task:
        query["task"] = [strip_prefix(t, "task") for t in task]
    selected = [r for r in found if all(_matches(r.entities.get(k), v) for k, v in query.items())]
    if not selected:
        raise NothingSelectedError(f"the filters {query} select none of {len(found)} runs", path=root,
                                   fix="loosen --participant-label/--session-label/--task/--bids-filter-file")

    runs = _prefer_preprocessed(selected, prefer_raw)
    for r in runs:
        _attach_companions(r)
    return sorted(runs, key=lambda r: (r.run_id, str(r.path)))


def _prefer_preprocessed(runs: list[Run], prefer_raw: bool = False) -> list[Run]:
    by_id: dict[str, list[Run]] = {}
    for r in runs:
        by_id.setdefault(r.run_id + "|" + str(r.entities.get("atlas", "")), []).append(r)
    out = []
    for group in by_id.values():
        volumes = [r for r in group if r.kind == "volume"]
        raws = [r for r in group if r.kind == "raw"]
        if prefer_raw and raws:
            out.extend(raws)
        elif volumes:
            # one standard space per run: the first of MNI_SPACES present
            rank = {s: i for i, s in enumerate(MNI_SPACES)}
            out.append(sorted(volumes, key=lambda r: rank.get(r.space or "", 99))[0])
        else:
            out.extend(group)
    return out


def _attach_companions(run: Run) -> None:
    try:
        run.metadata = read_sidecar(run.path, run.dataset or run.path.parent)
    except DataError as exc:
        run.metadata_error = exc.one_line()
        run.metadata = {}
    if run.kind == "raw" and _is_mni_image(run.path, run.metadata):
        run.kind = "volume"
        run.entities.setdefault("space", None)
    if run.kind != "volume":
        return
    stem = run.path.name.split("_bold.nii")[0]
    base = stem.replace("_desc-preproc", "")
    no_space = re.sub(r"_space-[A-Za-z0-9]+", "", base)
    no_space = re.sub(r"_res-[A-Za-z0-9]+", "", no_space)
    conf = run.path.parent / f"{no_space}_desc-confounds_timeseries.tsv"
    if not conf.is_file():
        conf = run.path.parent / f"{no_space}_desc-confounds_regressors.tsv"
    run.confounds = conf if conf.is_file() else None
    mask = run.path.parent / f"{base}_desc-brain_mask.nii.gz"
    run.mask = mask if mask.is_file() else None


def find_t1w(run: Run) -> Path | None:
    """The participant's T1-weighted image for a raw run (``sub-<L>/[ses-<S>/]anat/*_T1w.nii[.gz]``).

    The run's session is preferred, then any session; among several, the first by name (``run-1``
    before ``run-2``). Derivative images (``space-``/``desc-`` entities) are not raw T1w images.
    None when the participant has none.
    """
    root = Path(run.dataset or run.path.parents[2])
    sub = root / f"sub-{run.subject}"
    ses = run.entities.get("session")
    pattern = "*_T1w.nii*"
    cands = sorted((sub / f"ses-{ses}" / "anat").glob(pattern)) if ses else []
    cands += [p for p in sorted(sub.glob(f"**/anat/{pattern}")) if p not in cands]
    cands = [p for p in cands if p.name.endswith((".nii", ".nii.gz")) and "_space-" not in p.name
             and "_desc-" not in p.name]
    return cands[0] if cands else None
