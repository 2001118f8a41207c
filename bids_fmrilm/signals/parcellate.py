"""Streaming parcellation: a 4D image to ROI mean time series in memory independent of run length.

The atlas becomes a sparse matrix ``W`` (n_rois x n_voxels) whose row ``r`` averages the voxels
of region ``r``. The image is decompressed a chunk of volumes at a time straight from the file
(volumes are contiguous on disk in NIfTI), and each chunk is reduced with one sparse product, so
peak memory is one chunk plus ``W`` whatever the run's length, and there is no Python loop over
labels.

Non-finite voxel values are left out of a region's mean for the volumes where they occur; a
region with no voxel in the image's field of view (or inside the mask) yields NaN and is
reported in :attr:`Parcellation.empty_rois`.
"""

from __future__ import annotations

from dataclasses import dataclass
import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import Opener
from scipy import sparse

from ..errors import DataError, IOFailure, MissingInputError
from .atlas import Atlas


@dataclass
class Parcellation:
    """Result of :func:`parcellate`.

    Attributes
    ----------
    timeseries : ndarray of shape (n_volumes, n_rois), float64
        Mean signal per region; NaN for regions without voxels.
    voxel_counts : ndarray of shape (n_rois,)
        Voxels of the image grid assigned to each region.
    empty_rois : list of str
        Names of regions with no voxels in the image (outside the field of view or mask).
    """

    timeseries: np.ndarray
    voxel_counts: np.ndarray
    empty_rois: list[str]


def load_header(path: str | Path) -> nib.Nifti1Image:
    """Open a NIfTI file lazily and check it is a readable 4D image.

    Raises
    ------
    DataError
        For 3D images, empty images and header-only files.
    """
    path = Path(path)
    if not path.exists():
        broken = path.is_symlink()
        raise MissingInputError("file not found" + (" (broken symbolic link)" if broken else ""), path=path,
                                fix="restore the file (or its link target), or exclude the run with --bids-filter-file")
    try:
        img = nib.load(path)
    except Exception as exc:
        raise DataError(f"not a readable NIfTI image ({exc.__class__.__name__}: {exc})", path=path,
                        fix="re-export or re-download the file") from None
    shape = img.shape
    if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1):
        raise DataError(f"image is 3D {shape[:3]}, a 4D BOLD series is expected", path=path,
                        fix="give the 4D BOLD run, not a single volume")
    if len(shape) != 4 or min(shape) < 1:
        raise DataError(f"image has shape {shape}, expected (x, y, z, time)", path=path)
    dtype = np.dtype(img.header.get_data_dtype())
    if dtype.fields is not None or dtype.kind not in "biuf":  # RGB(A), complex, ...: not a BOLD magnitude series
        raise DataError(f"image data type {dtype.name if dtype.fields is None else 'RGB/structured'} is not a real-valued "
                        "scalar type", path=path, fix="give a magnitude BOLD series (integer or float voxels)")
    return img


def atlas_weights(atlas: Atlas, ref_img: nib.Nifti1Image, mask_img=None) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Sparse averaging matrix of an atlas on an image grid.

    The label image is resampled to the image grid with nearest-neighbour interpolation when the
    grids differ (as ``NiftiLabelsMasker(resampling_target="data")`` does); coordinate atlases
    become spheres of ``atlas.radius_mm`` (the nearest voxel when a sphere holds no voxel centre).

    Parameters
    ----------
    atlas : Atlas
    ref_img : nibabel image
        Defines the grid (shape of the first three axes and affine).
    mask_img : nibabel image, optional
        Brain mask on any grid; voxels outside it are left out.

    Returns
    -------
    weights : scipy.sparse.csr_matrix of shape (n_rois, n_voxels)
        Row-normalised indicator; voxels indexed in NIfTI (Fortran) order.
    counts : ndarray of shape (n_rois,)
    """
    shape = tuple(int(s) for s in ref_img.shape[:3])
    affine = ref_img.affine
    n_vox = int(np.prod(shape))
    keep = None
    if mask_img is not None:
        from nilearn.image import resample_to_img

        mask = resample_to_img(mask_img, nib.Nifti1Image(np.zeros(shape, np.int8), affine),
                               interpolation="nearest", copy_header=True, force_resample=True)
        keep = np.asarray(mask.dataobj).reshape(-1, order="F") > 0
    if atlas.kind == "labels":
        labels = _labels_on_grid(atlas.labels_img, shape, affine).reshape(-1, order="F")
        if keep is not None:
            labels = np.where(keep, labels, 0)
        index = atlas.rois["index"].to_numpy()
        lookup = np.full(int(max(labels.max(), index.max())) + 1, -1, dtype=np.int64)
        lookup[index] = np.arange(len(index))
        vox = np.flatnonzero(labels > 0)
        rows = lookup[labels[vox]]
        ok = rows >= 0
        rows, cols = rows[ok], vox[ok]
    elif atlas.kind == "spheres":
        rows, cols = _sphere_members(atlas, shape, affine, keep)
    else:
        raise DataError(f"atlas {atlas.name} has no image or coordinates to parcellate a volume with",
                        path=atlas.source, fix="choose a label-image or coordinate atlas with --atlas")
    counts = np.bincount(rows, minlength=atlas.n_rois).astype(np.float64)
    vals = 1.0 / counts[rows]
    w = sparse.csr_matrix((vals, (rows, cols)), shape=(atlas.n_rois, n_vox))
    return w, counts


def _labels_on_grid(labels_img: nib.Nifti1Image, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    if labels_img.shape[:3] == shape and np.allclose(labels_img.affine, affine, atol=1e-4):
        return np.asarray(labels_img.dataobj).astype(np.int64)
    from nilearn.image import resample_img

    res = resample_img(labels_img, target_affine=affine, target_shape=shape, interpolation="nearest",
                       copy_header=True, force_resample=True)
    return np.round(np.asarray(res.dataobj)).astype(np.int64)


def _sphere_members(atlas: Atlas, shape, affine, keep) -> tuple[np.ndarray, np.ndarray]:
    inv = np.linalg.inv(affine)
    vox_size = np.sqrt((affine[:3, :3] ** 2).sum(0))
    radius = float(atlas.radius_mm)
    rows, cols = [], []
    for r, xyz in enumerate(atlas.coords):
        if not np.all(np.isfinite(xyz)):
            continue
        c = nib.affines.apply_affine(inv, xyz)
        ext = np.ceil(radius / vox_size).astype(int) + 1
        lo = np.maximum(np.floor(c).astype(int) - ext, 0)
        hi = np.minimum(np.ceil(c).astype(int) + ext + 1, shape)
        if np.any(hi <= lo):
            continue
        grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
        ijk = grid.reshape(-1, 3)
        dist = np.linalg.norm(nib.affines.apply_affine(affine, ijk) - xyz, axis=1)
        sel = ijk[dist <= radius]
        if len(sel) == 0:
            j = int(np.argmin(dist))
            if dist[j] <= np.linalg.norm(vox_size) / 2:
                sel = ijk[j : j + 1]
        flat = np.ravel_multi_index(sel.T, shape, order="F") if len(sel) else np.empty(0, int)
        if keep is not None:
            flat = flat[keep[flat]]
        rows.append(np.full(len(flat), r))
        cols.append(flat)
    if not rows:
        return np.empty(0, int), np.empty(0, int)
    return np.concatenate(rows), np.concatenate(cols)


def iter_volumes(img: nib.Nifti1Image, chunk: int = 32, voxels: np.ndarray | None = None):
    """Yield ``(start, block)``, ``block`` of shape (n, n_voxels) float64, volumes in order.

    Reads the file sequentially with one open handle (a gzip stream is decompressed once, not
    re-read per chunk) and applies ``scl_slope``/``scl_inter``.

    Parameters
    ----------
    img : nibabel image
        A 4D image loaded from disk (its proxy gives offset, dtype and scaling).
    chunk : int
        Volumes per block.
    voxels : ndarray of int, optional
        Flat (Fortran-order) voxel indices to keep; all voxels when omitted.
    """
    path = img.get_filename()
    hdr = img.header
    proxy = img.dataobj
    # the proxy holds what was read from disk; a fresh header's vox_offset can read 0
    dtype = np.dtype(getattr(proxy, "dtype", hdr.get_data_dtype()))
    offset = int(getattr(proxy, "offset", hdr.get_data_offset()))
    n_vox = int(np.prod(img.shape[:3]))
    n_vol = int(img.shape[3])
    slope, inter = getattr(proxy, "slope", None), getattr(proxy, "inter", None)
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    step = n_vox * dtype.itemsize
    try:
        with Opener(path, "rb") as f:
            f.seek(offset)
            for start in range(0, n_vol, chunk):
                n = min(chunk, n_vol - start)
                buf = f.read(step * n)
                if len(buf) != step * n:
                    raise DataError(
                        f"file ends after {start + len(buf) // step} of {n_vol} volumes (truncated)",
                        path=path, fix="re-export or re-download the file")
                block = np.frombuffer(buf, dtype=dtype).reshape(n, n_vox)
                if voxels is not None:
                    block = block[:, voxels]
                block = block.astype(np.float64)
                if slope != 1.0:
                    block *= slope
                if inter != 0.0:
                    block += inter
                yield start, block
    except DataError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile, ValueError) as exc:  # damaged file: a data problem
        raise DataError(f"image data are corrupt or truncated ({exc.__class__.__name__}: {exc})", path=path,
                        fix="check the file is complete (gzip -t) and re-export or re-download it") from None
    except OSError as exc:  # the file system failed us
        raise IOFailure(f"cannot read image data ({exc.__class__.__name__}: {exc})", path=path,
                        fix="check the file is readable and the storage is healthy") from None


def parcellate(img, atlas: Atlas, mask_img=None, chunk: int = 32) -> Parcellation:
    """Mean signal of every atlas region, streaming the image chunk by chunk.

    Parameters
    ----------
    img : str, Path or nibabel image
        4D BOLD image on disk.
    atlas : Atlas
        Label-image or coordinate atlas in the image's template space.
    mask_img : nibabel image, optional
        Brain mask; voxels outside are ignored.
    chunk : int
        Volumes decompressed and reduced at a time (memory ~ chunk x volume size).

    Returns
    -------
    Parcellation
    """
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        img = load_header(img)
    w, counts = atlas_weights(atlas, img, mask_img)
    # indicator matrix for the rare chunks with non-finite voxels
    w_ind = None
    n_vol = int(img.shape[3])
    out = np.empty((n_vol, atlas.n_rois), dtype=np.float64)
    used = np.unique(w.indices)
    w_used = w[:, used].tocsr()
    for start, sub in iter_volumes(img, chunk, voxels=used):
        finite = np.isfinite(sub)
        if finite.all():
            out[start : start + len(sub)] = (w_used @ sub.T).T
            continue
        if w_ind is None:
            w_ind = w_used.copy()
            w_ind.data[:] = 1.0
        sub = np.where(finite, sub, 0.0)
        sums = (w_ind @ sub.T).T
        n_ok = (w_ind @ finite.T.astype(np.float64)).T
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + len(sub)] = np.where(n_ok > 0, sums / n_ok, np.nan)
    empty = counts == 0
    out[:, empty] = np.nan
    names = atlas.rois["name"].astype(str).to_numpy()
    return Parcellation(out, counts, list(names[empty]))
