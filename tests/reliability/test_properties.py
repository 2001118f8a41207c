"""Property tests: the signal functions and the TSV/JSON readers and writers.

Arbitrary finite or missing values round-trip; malformed input raises only BidsAppError
subclasses (exit codes), never a raw exception."""

from __future__ import annotations

import json
import math
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bids_fmrilm.bids.layout import read_dataset_description, read_sidecar
from bids_fmrilm.bids.writer import read_json, write_json, write_tsv
from bids_fmrilm.errors import BidsAppError
from bids_fmrilm.levels.labels import read_table
from bids_fmrilm.signals.clean import clean_timeseries, resample_to_tr, usable_columns
from bids_fmrilm.signals.pipeline import read_roi_timeseries

SETTINGS = settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
FAST = settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, allow_subnormal=False)
value = st.one_of(finite, finite, finite, st.just(np.nan))


@st.composite
def series(draw, min_volumes=3, max_volumes=40):
    """ROI series (n_volumes, n_rois): random columns, some constant, some with NaN."""
    n = draw(st.integers(min_volumes, max_volumes))
    k = draw(st.integers(1, 5))
    ts = draw(arrays(np.float64, (n, k), elements=finite))
    kinds = draw(st.lists(st.sampled_from(["ok", "ok", "const", "nan", "allnan"]), min_size=k, max_size=k))
    for j, kind in enumerate(kinds):
        if kind == "const":
            ts[:, j] = ts[0, j]
        elif kind == "nan":
            ts[draw(st.integers(0, n - 1)), j] = np.nan
        elif kind == "allnan":
            ts[:, j] = np.nan
    return ts


def _expected_usable(ts):
    return np.array([np.isfinite(c).all() and np.ptp(c) > 0 for c in ts.T])


@SETTINGS
@given(series(), st.booleans())
def test_usable_columns(ts, _):
    ok = usable_columns(ts)
    assert ok.dtype == bool and ok.shape == (ts.shape[1],)
    assert not ok[~np.isfinite(ts).all(0)].any()  # any NaN: not usable
    assert not ok[np.ptp(np.nan_to_num(ts), axis=0) == 0].any()  # constant: not usable


@SETTINGS
@given(series(min_volumes=19), st.floats(0.5, 3.0), st.sampled_from([None, 0.008, 0.01]),
       st.booleans(), st.booleans())
def test_clean_timeseries(ts, tr, high_pass, detrend, with_confounds):
    rng = np.random.default_rng(0)
    conf = rng.normal(size=(len(ts), 3)) if with_confounds else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = clean_timeseries(ts, tr, conf, detrend=detrend, high_pass=high_pass)
    ok = usable_columns(ts)
    assert out.shape == ts.shape
    assert np.isnan(out[:, ~ok]).all()  # dead ROIs stay NaN, never contaminate the others
    assert np.isfinite(out[:, ok]).all()
    if detrend and high_pass is None and ok.any():  # detrending alone leaves zero-mean series
        assert np.allclose(out[:, ok].mean(0), 0, atol=1e-6 * max(1.0, np.abs(ts[:, ok]).max()))


@SETTINGS
@given(series(), st.floats(0.4, 4.0), st.sampled_from([0.8, 1.0, 2.0, 2.5]))
def test_resample_to_tr(ts, tr, target):
    out = resample_to_tr(ts, tr, target)
    ok = np.isfinite(ts).all(0)
    if abs(tr - target) < 1e-6:
        assert np.array_equal(out, ts, equal_nan=True)
        return
    ratio = Fraction(tr / target).limit_denominator(100)
    assert out.shape == (math.ceil(len(ts) * ratio.numerator / ratio.denominator), ts.shape[1])
    assert abs(out.shape[0] - len(ts) * tr / target) <= 1 + 0.005 * len(ts) * tr / target
    assert np.isnan(out[:, ~ok]).all() and np.isfinite(out[:, ok]).all()


names = st.lists(st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.", min_size=1, max_size=12)
                 .filter(lambda s: s.lower() not in ("nan", "n/a", "na", "null", "none")),
                 min_size=1, max_size=6, unique=True)


@SETTINGS
@given(names, st.data(), st.booleans())
def test_tsv_round_trip(tmp_path_factory, cols, data, gz):
    n = data.draw(st.integers(1, 12))
    values = data.draw(arrays(np.float64, (n, len(cols)), elements=value))
    df = pd.DataFrame(values, columns=cols)
    path = tmp_path_factory.mktemp("tsv") / ("x_timeseries.tsv" + (".gz" if gz else ""))
    write_tsv(path, df)
    text_nas = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    assert set(text_nas.to_numpy().ravel()[np.isnan(values).ravel()]) <= {"n/a"}
    back = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    assert list(back.columns) == cols
    assert np.allclose(back.to_numpy(float), values, rtol=1e-5, atol=0, equal_nan=True)
    ts, roi_names = read_roi_timeseries(path)
    assert roi_names == cols and np.allclose(ts, values, rtol=1e-5, atol=0, equal_nan=True)
    first = path.read_bytes()
    write_tsv(path, df)  # equal data, equal bytes (gzip mtime 0)
    assert path.read_bytes() == first
    assert not list(path.parent.glob(".*.tmp"))


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53), st.text(max_size=20),
                      st.floats(allow_nan=True, allow_infinity=True))
json_obj = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
                        max_leaves=20)


def _nan_to_none(o):
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_nan_to_none(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


@FAST
@given(st.dictionaries(st.text(max_size=10), json_obj, max_size=6))
def test_json_round_trip(tmp_path_factory, obj):
    path = tmp_path_factory.mktemp("json") / "x.json"
    write_json(path, obj)
    back = read_json(path)
    assert back == _nan_to_none(obj)  # NaN/inf are written as null: standard JSON
    json.loads(path.read_text(encoding="utf-8"))  # strict JSON
    assert not list(path.parent.glob(".*.tmp"))


def test_json_numpy_values(tmp_path):
    obj = {"a": np.float32(1.5), "b": np.int64(3), "c": np.array([1.0, np.nan]), "d": np.bool_(True), "e": np.nan}
    write_json(tmp_path / "x.json", obj)
    assert read_json(tmp_path / "x.json") == {"a": 1.5, "b": 3, "c": [1.0, None], "d": True, "e": None}


junk = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
    json_obj.map(lambda o: json.dumps(o).encode()),
    st.sampled_from([b"[" * 5000, b"{" * 5000, b'{"a": ' * 3000, b"\xff\xfe{}", b"", b"null", b"[1, 2]", b'"x"',
                     b"\t\t\n\n", b"a\tb\n1\n", b"a\tb\n1\t2\t3\n", b"\x1f\x8b\x08\x00junk", b'"a\n1\n']),
)


@FAST
@given(junk)
def test_read_json_never_raises(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("rj") / "x.json"
    path.write_bytes(blob)
    read_json(path)  # None for anything unreadable
    assert read_json(path.parent / "absent.json") is None


def _only_bids_errors(fn, *args):
    try:
        return fn(*args)
    except BidsAppError as exc:
        assert exc.one_line().count("\n") == 0
        return exc


@FAST
@given(junk)
def test_read_sidecar_malformed(tmp_path_factory, blob):
    root = tmp_path_factory.mktemp("sc")
    func = root / "sub-01" / "func"
    func.mkdir(parents=True)
    data = func / "sub-01_task-rest_bold.nii.gz"
    (func / "sub-01_task-rest_bold.json").write_bytes(blob)
    (root / "task-rest_bold.json").write_text('{"RepetitionTime": 2.0}')
    res = _only_bids_errors(read_sidecar, data, root)
    if isinstance(res, BidsAppError):
        assert int(res.code) == 65 and "sub-01_task-rest_bold.json" in res.one_line()
    else:
        assert isinstance(res, dict) and "RepetitionTime" in res
    (root / "dataset_description.json").write_bytes(blob)
    desc = _only_bids_errors(read_dataset_description, root)
    assert isinstance(desc, dict | BidsAppError)


@FAST
@given(junk, st.booleans())
def test_read_roi_timeseries_malformed(tmp_path_factory, blob, gz):
    import gzip

    path = tmp_path_factory.mktemp("roi") / ("x_timeseries.tsv" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(blob, mtime=0) if gz else blob)
    res = _only_bids_errors(read_roi_timeseries, path)
    if not isinstance(res, BidsAppError):
        ts, cols = res
        assert ts.dtype == float and ts.ndim == 2 and len(cols) == ts.shape[1]


@FAST
@given(junk)
def test_read_table_malformed(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("tab") / "participants.tsv"
    path.write_bytes(blob)
    res = _only_bids_errors(read_table, path)
    if not isinstance(res, BidsAppError):
        assert res.index.name == "participant_id" and res.index.is_unique


@SETTINGS
@given(st.lists(st.text("0123456789abcXYZ", min_size=1, max_size=4), min_size=1, max_size=8),
       st.lists(st.one_of(st.none(), st.text("abcdef0123456789 .", max_size=6)), min_size=8, max_size=8))
def test_read_table_round_trip(tmp_path_factory, ids, labels):
    path = tmp_path_factory.mktemp("tab") / "participants.tsv"
    df = pd.DataFrame({"participant_id": [f"sub-{i}" for i in ids], "label": labels[: len(ids)]})
    df.to_csv(path, sep="\t", index=False, na_rep="n/a")
    res = _only_bids_errors(read_table, path)
    if len(set(ids)) < len(ids):
        assert isinstance(res, BidsAppError) and int(res.code) == 65 and "duplicate participant_id" in res.one_line()
    else:
        assert list(res.index) == ids
