"""Atlases: label images or coordinate spheres, each ROI with an MNI centroid and a network.

An :class:`Atlas` is what the rest of the pipeline needs to know about a parcellation: a table
of regions (``index``, ``name``, ``network``, ``x``, ``y``, ``z`` in MNI mm) and, for volumetric
atlases, the label image. Coordinates are what lets one tokenizer checkpoint serve any atlas.

Atlases resolve by name through a small registry, or by path:

- ``seitzman300`` (default; bundled with nilearn, works offline, 14 networks),
  ``power264`` and ``dosenbach160`` (coordinate atlases bundled with nilearn);
- ``schaefer400tian`` / ``schaefer100tian``: the Schaefer-2018 + Tian subcortex label images,
  found in ``$BIDS_FMRILM_ATLAS_DIR``, then in the package's atlas folder, then fetched when the
  network allows;
- ``cc200``: the Craddock-200 ROI table (centroids) for ROI time-series inputs such as ABIDE PCP;
- any NIfTI label image path, with its label table next to it (``<stem>.tsv`` with ``index`` and
  ``name`` columns, a Tian-style ``<stem>_label.txt``, or ``<stem>.csv``).

Atlases without network labels get, per ROI, the network of the nearest Seitzman-2018 ROI within
:data:`NETWORK_MAX_DISTANCE_MM`, else ``unassigned``.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.request
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from ..errors import DataError, MissingInputError, UsageError

NETWORK_MAX_DISTANCE_MM = 10.0
"""Largest distance (mm) from an ROI centroid to a Seitzman ROI for the network to be borrowed."""

ROI_COLUMNS = ["index", "name", "network", "x", "y", "z"]

YEO7_NAMES = {
    "Vis": "Visual",
    "SomMot": "Somatomotor",
    "DorsAttn": "DorsalAttention",
    "SalVentAttn": "SalienceVentralAttention",
    "Limbic": "Limbic",
    "Cont": "FrontoParietal",
    "Default": "DefaultMode",
}

_SCHAEFER_TIAN = {
    "schaefer400tian": (
        "Schaefer2018_400Parcels_7Networks_order_Tian_Subcortex_S3",
        "https://raw.githubusercontent.com/yetianmed/subcortex/master/Group-Parcellation/3T/"
        "Cortex-Subcortex/MNIvolumetric/",
    ),
    "schaefer100tian": (
        "Schaefer2018_100Parcels_7Networks_order_Tian_Subcortex_S1",
        "https://raw.githubusercontent.com/yetianmed/subcortex/master/Group-Parcellation/3T/"
        "Cortex-Subcortex/MNIvolumetric/",
    ),
}


@dataclass
class Atlas:
    """A parcellation with one row per region.

    Attributes
    ----------
    name : str
        Short name used in the BIDS ``atlas-<name>`` entity (alphanumeric).
    rois : pandas.DataFrame
        Columns ``index`` (label value or running number), ``name``, ``network``, and the MNI
        centroid ``x``, ``y``, ``z`` in mm; one row per region, in output column order.
    labels_img : nibabel.Nifti1Image or None
        Integer label image for volumetric atlases; ``None`` for coordinate atlases and ROI tables.
    radius_mm : float or None
        Sphere radius for coordinate atlases.
    space : str
        Template space of the coordinates and image.
    source : str
        Where the atlas came from (path or registry name), for provenance.
    """

    name: str
    rois: pd.DataFrame
    labels_img: nib.Nifti1Image | None = None
    radius_mm: float | None = None
    space: str = "MNI152NLin6Asym"
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``"labels"``, ``"spheres"`` or ``"table"`` (ROI table only, for ROI time-series inputs)."""
        if self.labels_img is not None:
            return "labels"
        return "spheres" if self.radius_mm else "table"

    @property
    def n_rois(self) -> int:
        return len(self.rois)

    @property
    def coords(self) -> np.ndarray:
        """(n_rois, 3) MNI centroids in mm."""
        return self.rois[["x", "y", "z"]].to_numpy(dtype=float)

    def digest(self) -> str:
        """Content hash of the ROI table and label image, for provenance and caching."""
        h = hashlib.sha256(self.rois.to_csv(index=False).encode())
        if self.labels_img is not None:
            h.update(np.asarray(self.labels_img.dataobj).tobytes())
            h.update(self.labels_img.affine.tobytes())
        return h.hexdigest()[:16]

    def roi_table_tsv(self) -> str:
        """The ROI table as TSV text (BIDS ``n/a`` for missing values)."""
        return self.rois[ROI_COLUMNS].to_csv(sep="\t", index=False, na_rep="n/a")


def atlas_dirs() -> list[Path]:
    """Folders searched for atlas files, in order."""
    dirs = []
    env = os.environ.get("BIDS_FMRILM_ATLAS_DIR")
    if env:
        dirs.extend(Path(p) for p in env.split(os.pathsep) if p)
    dirs.append(Path(__file__).resolve().parent.parent / "data" / "atlases")
    dirs.append(Path.home() / ".cache" / "bids_fmrilm" / "atlases")
    return dirs


def _find_file(filename: str) -> Path | None:
    for d in atlas_dirs():
        if (d / filename).is_file():
            return d / filename
    return None


def available_atlases() -> list[str]:
    """Names the registry knows (availability of downloadable files is checked on load)."""
    return ["seitzman300", "power264", "dosenbach160", "schaefer400tian", "schaefer100tian", "cc200"]


def load_atlas(spec: str | os.PathLike, space: str = "MNI152NLin6Asym") -> Atlas:
    """Resolve an atlas by registry name or path.

    Parameters
    ----------
    spec : str or path-like
        A registry name (see :func:`available_atlases`, case-insensitive) or a path to a NIfTI
        label image (with its label table next to it) or to an ROI table (``.tsv``/``.csv`` with
        ``x``, ``y``, ``z`` columns).
    space : str
        Preferred template space where the atlas exists in several (Schaefer-Tian 400).

    Returns
    -------
    Atlas
    """
    key = str(spec).strip()
    low = key.lower().replace("-", "").replace("_", "")
    if low in ("seitzman300", "seitzman", "seitzman2018"):
        return _seitzman()
    if low in ("power264", "power", "power2011"):
        return _nilearn_coords("power264")
    if low in ("dosenbach160", "dosenbach", "dosenbach2010"):
        return _nilearn_coords("dosenbach160")
    if low in _SCHAEFER_TIAN:
        return _schaefer_tian(low, space)
    if low == "cc200":
        path = _find_file("CC200_centroids.csv")
        if path is None:
            raise MissingInputError(
                "the CC200 ROI table (CC200_centroids.csv) was not found in "
                + ", ".join(str(d) for d in atlas_dirs()),
                fix="set BIDS_FMRILM_ATLAS_DIR to the folder that holds it",
            )
        return _table_atlas(path, name="CC200")
    path = Path(key).expanduser()
    if path.exists():
        if path.suffix in (".tsv", ".csv"):
            return _table_atlas(path)
        return _labels_atlas(path)
    raise UsageError(
        f"unknown atlas {key!r}",
        fix=f"use one of {', '.join(available_atlases())} or a path to a NIfTI label image",
    )


def clean_name(text: str) -> str:
    """Alphanumeric form of an atlas name, usable as a BIDS entity value."""
    return re.sub(r"[^A-Za-z0-9]", "", text) or "custom"


@lru_cache(maxsize=1)
def _seitzman_table() -> pd.DataFrame:
    from nilearn import datasets

    s = datasets.fetch_coords_seitzman_2018()
    rois = s.rois.reset_index(drop=True)
    return pd.DataFrame(
        {
            "index": np.arange(1, len(rois) + 1),
            "name": [f"{r}_{i + 1}" for i, r in enumerate(s.regions)],
            "network": list(s.networks),
            "x": rois["x"].to_numpy(float),
            "y": rois["y"].to_numpy(float),
            "z": rois["z"].to_numpy(float),
        }
    )


def _seitzman() -> Atlas:
    return Atlas("Seitzman300", _seitzman_table().copy(), radius_mm=5.0, source="nilearn:seitzman_2018")


def _nilearn_coords(which: str) -> Atlas:
    from nilearn import datasets

    if which == "power264":
        d = datasets.fetch_coords_power_2011()
        rois, radius, name = d.rois, 5.0, "Power264"
        names = [f"ROI{int(i)}" for i in rois["roi"]]
    else:
        d = datasets.fetch_coords_dosenbach_2010()
        rois, radius, name = d.rois.reset_index(drop=True), 4.5, "Dosenbach160"
        names = [str(n) for n in d.labels]
    table = pd.DataFrame(
        {
            "index": np.arange(1, len(rois) + 1),
            "name": names,
            "x": rois["x"].to_numpy(float),
            "y": rois["y"].to_numpy(float),
            "z": rois["z"].to_numpy(float),
        }
    )
    table["network"] = assign_networks(table[["x", "y", "z"]].to_numpy())
    return Atlas(name, table[ROI_COLUMNS], radius_mm=radius, source=f"nilearn:{which}")


def assign_networks(coords: np.ndarray, max_distance_mm: float = NETWORK_MAX_DISTANCE_MM) -> list[str]:
    """Network of the nearest Seitzman-2018 ROI within ``max_distance_mm``, else ``unassigned``.

    Parameters
    ----------
    coords : ndarray of shape (n_rois, 3)
        MNI coordinates in mm; rows with NaN get ``unassigned``.
    max_distance_mm : float
        Largest accepted distance to the nearest Seitzman ROI.
    """
    ref = _seitzman_table()
    ref_xyz = ref[["x", "y", "z"]].to_numpy(float)
    coords = np.asarray(coords, dtype=float).reshape(-1, 3)
    d = np.linalg.norm(coords[:, None, :] - ref_xyz[None], axis=-1)
    nearest = np.nanargmin(np.where(np.isnan(d), np.inf, d), axis=1)
    out = []
    for i, j in enumerate(nearest):
        ok = np.isfinite(d[i, j]) and d[i, j] <= max_distance_mm
        out.append(ref["network"].iloc[j] if ok else "unassigned")
    return out


def yeo_network_from_name(name: str) -> str | None:
    """Yeo-7 network from a Schaefer label such as ``7Networks_LH_Vis_1``; None if absent."""
    m = re.search(r"7Networks_[LR]H_([A-Za-z]+)_", name)
    if m and m.group(1) in YEO7_NAMES:
        return YEO7_NAMES[m.group(1)]
    return None


def _schaefer_tian(key: str, space: str) -> Atlas:
    stem, base_url = _SCHAEFER_TIAN[key]
    n = "400" if "400" in key else "100"
    spaces = [space] + [s for s in ("MNI152NLin6Asym", "MNI152NLin2009cAsym") if s != space]
    candidates = [f"{stem}{infix}_{sp}_2mm.nii.gz" for sp in spaces for infix in ("", "_3T")]
    img_path = next((p for c in candidates if (p := _find_file(c)) is not None), None)
    label_path = _find_file(f"{stem}_label.txt")
    if img_path is None or label_path is None:
        img_path, label_path = _fetch_schaefer_tian(stem, base_url, f"{stem}_3T_{space}_2mm.nii.gz" if "NLin2009c" in space else candidates[0])
    atlas = _labels_atlas(img_path, label_path=label_path, name=f"Schaefer{n}Tian")
    atlas.space = "MNI152NLin2009cAsym" if "NLin2009cAsym" in img_path.name else "MNI152NLin6Asym"
    atlas.source = key
    return atlas


def _fetch_schaefer_tian(stem: str, base_url: str, img_name: str) -> tuple[Path, Path]:
    dest = Path.home() / ".cache" / "bids_fmrilm" / "atlases"
    names = (img_name, f"{stem}_label.txt")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for fname in names:
            if not (dest / fname).exists():
                tmp = dest / f".{fname}.part"
                with urllib.request.urlopen(base_url + fname, timeout=30) as r, open(tmp, "wb") as f:
                    f.write(r.read())
                tmp.replace(dest / fname)
    except OSError as exc:
        raise MissingInputError(
            f"atlas files {names[0]} and {names[1]} are not available locally and could not be "
            f"fetched ({exc.__class__.__name__})",
            fix="download them into a folder and set BIDS_FMRILM_ATLAS_DIR to it",
        ) from None
    return dest / names[0], dest / names[1]


def read_label_table(path: Path) -> pd.DataFrame:
    """Read a label table: BIDS-style TSV, CSV, or Tian-style ``_label.txt``.

    Returns a frame with at least ``index`` and ``name``; ``network``, ``x``, ``y``, ``z`` when the
    file has them.
    """
    path = Path(path)
    if path.suffix == ".txt":
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if len(lines) % 2:
            raise DataError("label file must alternate name and colour lines", path=path)
        names = lines[0::2]
        index = [int(lines[i].split()[0]) for i in range(1, len(lines), 2)]
        return pd.DataFrame({"index": index, "name": names})
    sep = "\t" if path.suffix == ".tsv" else ","
    df = pd.read_csv(path, sep=sep)
    df.columns = [c.strip().lower() for c in df.columns]
    if "index" not in df.columns:
        for alt in ("roi number", "label", "value", "roi"):
            if alt in df.columns:
                df = df.rename(columns={alt: "index"})
                break
    if "index" not in df.columns:
        raise DataError("label table has no 'index' column", path=path, fix="add an index column")
    if "name" not in df.columns:
        df["name"] = [f"ROI{int(i):03d}" for i in df["index"]]
    return df


def _companion_table(img_path: Path) -> Path | None:
    stem = img_path.name.split(".nii")[0]
    cands = [f"{stem}.tsv", f"{stem}.csv", f"{stem}_label.txt"]
    base = re.sub(r"_(MNI152\w+?|3T_MNI152\w+?)_\d+mm$", "", stem)
    cands += [f"{base}_label.txt", f"{base}.tsv"]
    for c in cands:
        if (img_path.parent / c).is_file():
            return img_path.parent / c
    return None


def _labels_atlas(img_path: Path, label_path: Path | None = None, name: str | None = None) -> Atlas:
    img_path = Path(img_path)
    try:
        img = nib.load(img_path)
        data = np.asarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise DataError(f"cannot read atlas image ({exc})", path=img_path) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError("atlas image must be a 3D label image", path=img_path)
    if not np.allclose(data, np.round(data)):
        raise DataError("atlas image holds non-integer values", path=img_path,
                        fix="give a label (not probabilistic) atlas")
    data = np.round(data).astype(np.int32)
    labels_img = nib.Nifti1Image(data, img.affine)
    present = np.unique(data[data > 0])
    label_path = label_path or _companion_table(img_path)
    if label_path is not None:
        table = read_label_table(label_path)
        table = table[table["index"].isin(present)].reset_index(drop=True)
        missing = np.setdiff1d(present, table["index"].to_numpy())
        if len(missing):
            extra = pd.DataFrame({"index": missing, "name": [f"label{m}" for m in missing]})
            table = pd.concat([table, extra], ignore_index=True).sort_values("index")
    else:
        table = pd.DataFrame({"index": present, "name": [f"label{m}" for m in present]})
    table = table.reset_index(drop=True)
    if not {"x", "y", "z"} <= set(table.columns):
        centroids = ndimage.center_of_mass(np.ones_like(data), data, table["index"].to_numpy())
        ijk = np.asarray(centroids, dtype=float)
        xyz = nib.affines.apply_affine(img.affine, ijk)
        table["x"], table["y"], table["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    if "network" not in table.columns:
        yeo = [yeo_network_from_name(str(n)) for n in table["name"]]
        nearest = assign_networks(table[["x", "y", "z"]].to_numpy())
        subcortex = [_is_tian_subcortex(str(n)) for n in table["name"]]
        table["network"] = [
            y if y else ("Subcortical" if sc else nb) for y, sc, nb in zip(yeo, subcortex, nearest)
        ]
    nm = name or clean_name(img_path.name.split(".nii")[0].split("_")[0])
    return Atlas(nm, table[ROI_COLUMNS].copy(), labels_img=labels_img, source=str(img_path))


def _is_tian_subcortex(name: str) -> bool:
    return bool(re.match(r"^(HIP|AMY|THA|NAc|GP|PUT|CAU|pTHA|aTHA|lAMY|mAMY)", name)) or name.endswith(
        ("-rh", "-lh")
    )


def _table_atlas(path: Path, name: str | None = None) -> Atlas:
    table = read_label_table(Path(path))
    if not {"x", "y", "z"} <= set(table.columns):
        raise DataError("ROI table needs x, y, z (MNI mm) columns", path=path)
    table = table.copy()
    if name == "CC200" or "ROI" not in str(table["name"].iloc[0]):
        table["name"] = [f"ROI{int(i):03d}" for i in table["index"]]
    if "network" not in table.columns:
        table["network"] = assign_networks(table[["x", "y", "z"]].to_numpy())
    nm = name or clean_name(Path(path).stem.split("_")[0])
    return Atlas(nm, table[ROI_COLUMNS].reset_index(drop=True), source=str(path))


def table_for_columns(columns: list[str], atlas_name: str) -> Atlas:
    """ROI-table atlas for an ROI time-series file whose atlas is not in the registry.

    Coordinates are unknown (NaN) and networks ``unassigned``; downstream steps that need
    coordinates say so.
    """
    table = pd.DataFrame(
        {
            "index": np.arange(1, len(columns) + 1),
            "name": list(columns),
            "network": "unassigned",
            "x": np.nan,
            "y": np.nan,
            "z": np.nan,
        }
    )
    return Atlas(clean_name(atlas_name), table, source="columns")
