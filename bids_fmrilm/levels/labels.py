"""Group-level labels: read, check, and decide classification vs regression.

Labels come from a column of the input's ``participants.tsv`` (``--label``) or from a TSV with a
``participant_id`` column (``--labels-file``). Participants without a label are excluded and
reported. Problems are errors with exit codes: an absent column is a usage error (64); one class
only, a non-numeric regression target, duplicate participants or too few participants for the
folds are data errors (65).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..bids.layout import strip_prefix
from ..errors import DataError, MissingInputError, UsageError

MISSING = ["n/a", "N/A", "NA", "nan", "NaN", ""]


@dataclass
class Labels:
    """Labels of the participants that have one.

    Attributes
    ----------
    name : str
        Column name.
    task_type : {"classification", "regression"}
    values : pandas.Series
        Indexed by participant label without ``sub-``.
    excluded : list of str
        Participants in the table without a label.
    groups : pandas.Series or None
        CV grouping column (e.g. ``site``), same index, when asked for.
    """

    name: str
    task_type: str
    values: pd.Series
    excluded: list[str] = field(default_factory=list)
    groups: pd.Series | None = None

    @property
    def classes(self) -> list[str]:
        return sorted(map(str, self.values.unique())) if self.task_type == "classification" else []


def read_table(path: Path) -> pd.DataFrame:
    """Read a participants-style TSV, ``participant_id`` as plain labels (no ``sub-``)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError("labels table not found", path=path,
                                fix="give participants.tsv in BIDS_DIR or --labels-file FILE")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, na_values=MISSING, keep_default_na=False)
    except Exception as exc:
        raise DataError(f"cannot read TSV ({exc.__class__.__name__}: {exc})", path=path) from None
    if "participant_id" not in df.columns:
        raise DataError("no participant_id column", path=path, fix="add a participant_id column (sub-<label>)")
    df["participant_id"] = df["participant_id"].astype(str).map(lambda s: strip_prefix(s, "sub"))
    dup = df["participant_id"][df["participant_id"].duplicated()].unique()
    if len(dup):
        raise DataError(f"duplicate participant_id {', '.join(map(str, dup[:5]))}", path=path,
                        fix="keep one row per participant")
    return df.set_index("participant_id")


def load_labels(table: Path, column: str, task_type: str = "auto", group_column: str | None = None,
                min_per_class: int = 2) -> Labels:
    """Labels of ``column`` with the task type detected from the values (or forced).

    Parameters
    ----------
    table : path
        participants.tsv or another TSV with ``participant_id``.
    column : str
        Label column.
    task_type : {"auto", "classification", "regression"}
        ``auto``: numeric values with more than 10 distinct values are a regression target,
        anything else a classification target.
    group_column : str, optional
        Column whose values group participants in cross-validation (e.g. ``site``).
    min_per_class : int
        Fewest participants a class must have.
    """
    df = read_table(table)
    if column not in df.columns:
        raise UsageError(f"label column {column!r} is not in the table (columns: {', '.join(df.columns[:12])})",
                         path=table, fix="pass --label with one of those columns")
    raw = df[column]
    excluded = sorted(raw.index[raw.isna()].tolist())
    vals = raw.dropna()
    numeric = pd.to_numeric(vals, errors="coerce")
    if task_type == "auto":
        task_type = "regression" if numeric.notna().all() and numeric.nunique() > 10 else "classification"
    if task_type == "regression":
        if numeric.isna().any():
            bad = vals[numeric.isna()].iloc[:3].tolist()
            raise DataError(f"regression target {column!r} has non-numeric values {bad}", path=table,
                            fix="use numbers (n/a for missing) or --task-type classification")
        vals = numeric.astype(float)
        if vals.nunique() < 2:
            raise DataError(f"regression target {column!r} is constant", path=table)
    else:
        vals = vals.astype(str)
        counts = vals.value_counts()
        if len(counts) < 2:
            raise DataError(f"label {column!r} has one class only ({counts.index[0]!r})", path=table,
                            fix="choose a column with at least two classes")
        small = counts[counts < min_per_class]
        if len(small):
            raise DataError(f"classes with fewer than {min_per_class} participants: {dict(small)}", path=table,
                            fix="merge or drop rare classes")
    groups = None
    if group_column is not None:
        if group_column not in df.columns:
            raise UsageError(f"CV group column {group_column!r} is not in the table", path=table,
                             fix="pass --cv-group with an existing column")
        groups = df.loc[vals.index, group_column].fillna("n/a").astype(str)
    return Labels(column, task_type, vals, excluded, groups)
