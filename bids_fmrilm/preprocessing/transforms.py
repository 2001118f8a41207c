"""Geometry shared by the preprocessing steps: images between nibabel and ANTs, ANTs transforms as
4x4 matrices, rigid-body parameters and framewise displacement.

Conventions
-----------
* nibabel affines map voxel indices to RAS+ millimetres; ITK/ANTs physical points are LPS+. The
  helpers here convert explicitly (``LPS = diag(-1, -1, 1) @ RAS``), so that a grid built with
  :func:`to_ants` has exactly the voxel-to-world map of its nibabel image, whatever the header's
  qform/sform say.
* An ANTs registration ``fixed <- moving`` gives a transform that maps *points of the fixed space*
  to points of the moving space (the direction images are pulled with). Transform lists follow
  ``antsApplyTransforms``: the first one is applied to the fixed-space point first.
* Motion parameters (fMRIPrep's ``trans_x .. rot_z``) describe the rigid transform that carries a
  point of the reference volume to where it lies in volume *t* (RAS+ mm), written as a rotation
  ``R = Rz(rot_z) @ Ry(rot_y) @ Rx(rot_x)`` (radians) about the centre of the reference volume's
  field of view followed by the translation ``(trans_x, trans_y, trans_z)`` of that centre.
"""

from __future__ import annotations

import numpy as np

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
"""RAS <-> LPS (its own inverse)."""

MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]


def to_ants(data: np.ndarray, affine: np.ndarray):
    """An ANTs image of a 3D array with the nibabel (RAS) ``affine``'s geometry.

    Shear is removed (ITK images have orthonormal directions): the columns of the 3x3 part are
    orthonormalised by a polar decomposition, which leaves ordinary scanner affines unchanged.
    """
    import ants

    lps = FLIP @ np.asarray(affine, float)
    m = lps[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    direction = m / spacing
    u, _, vt = np.linalg.svd(direction)
    direction = u @ vt
    return ants.from_numpy(np.ascontiguousarray(data, dtype=np.float32), origin=tuple(lps[:3, 3].tolist()),
                           spacing=tuple(spacing.tolist()), direction=direction)


def ants_affine_lps(img) -> np.ndarray:
    """Voxel index -> LPS point 4x4 matrix of an ANTs image."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(img.direction) @ np.diag(img.spacing)
    m[:3, 3] = img.origin
    return m


def ants_affine_ras(img) -> np.ndarray:
    """Voxel index -> RAS point (a nibabel affine) of an ANTs image."""
    return FLIP @ ants_affine_lps(img)


def read_linear(path: str) -> np.ndarray:
    """An ANTs/ITK linear transform file (``.mat``) as a 4x4 LPS point map.

    ITK's ``MatrixOffsetTransformBase``: ``y = A (x - c) + t + c`` with parameters ``A`` (row
    major), ``t`` and fixed parameters ``c`` (the centre).
    """
    import ants

    tx = ants.read_transform(str(path))
    p = np.asarray(tx.parameters, float)
    c = np.asarray(tx.fixed_parameters, float)[:3]
    a = p[:9].reshape(3, 3)
    t = p[9:12]
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = t + c - a @ c
    return m


def write_linear(matrix_lps: np.ndarray, path: str) -> str:
    """Write a 4x4 LPS point map as an ITK ``AffineTransform_double_3_3`` (``.mat``/``.txt``)."""
    import ants

    tx = ants.create_ants_transform(transform_type="AffineTransform", precision="double", dimension=3,
                                    matrix=np.asarray(matrix_lps)[:3, :3], translation=np.asarray(matrix_lps)[:3, 3],
                                    center=np.zeros(3))
    ants.write_transform(tx, str(path))
    return str(path)


def euler_matrix(rx: float, ry: float, rz: float) -> np.ndarray:
    """``Rz @ Ry @ Rx`` (radians)."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rx_m = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry_m = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz_m = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz_m @ ry_m @ rx_m


def rigid_matrix(params, center) -> np.ndarray:
    """4x4 RAS point map from six parameters (mm, radians) about ``center`` (RAS mm)."""
    tx, ty, tz, rx, ry, rz = (float(v) for v in params)
    r = euler_matrix(rx, ry, rz)
    c = np.asarray(center, float)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c + np.array([tx, ty, tz]) - r @ c
    return m


def rigid_params(matrix_ras: np.ndarray, center) -> np.ndarray:
    """Six parameters (trans mm, rot radians) of a rigid 4x4 RAS point map about ``center``.

    The inverse of :func:`rigid_matrix`; the 3x3 part is projected on the nearest rotation first.
    """
    m = np.asarray(matrix_ras, float)
    u, _, vt = np.linalg.svd(m[:3, :3])
    r = u @ vt
    c = np.asarray(center, float)
    trans = m[:3, :3] @ c + m[:3, 3] - c
    ry = -np.arcsin(np.clip(r[2, 0], -1.0, 1.0))
    rx = np.arctan2(r[2, 1], r[2, 2])
    rz = np.arctan2(r[1, 0], r[0, 0])
    return np.r_[trans, rx, ry, rz]


def framewise_displacement(params: np.ndarray, radius_mm: float = 50.0) -> np.ndarray:
    """Power et al. (2012) FD: ``sum |d trans| + radius * sum |d rot|``; NaN for the first volume."""
    params = np.asarray(params, float)
    d = np.abs(np.diff(params, axis=0))
    fd = d[:, :3].sum(1) + radius_mm * d[:, 3:].sum(1)
    return np.r_[np.nan, fd]


def grid_points_ras(shape, affine: np.ndarray) -> np.ndarray:
    """RAS points (n, 3) of every voxel of a grid, Fortran (NIfTI) order."""
    ijk = np.stack([a.ravel(order="F") for a in np.indices(tuple(shape), dtype=np.float32)], axis=1)
    return (ijk @ np.asarray(affine, np.float32)[:3, :3].T + np.asarray(affine, np.float32)[:3, 3]).astype(np.float32)
