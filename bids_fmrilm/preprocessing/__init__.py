"""Minimal preprocessing of raw (scanner-space) BOLD runs with ANTsPy: non-steady-state volumes,
head motion, registration to MNI (via the T1w, or directly), one resampling, confounds.

fMRIPrep remains the recommended path; this step runs only for raw runs without fMRIPrep output
(``--preproc auto``, the default, or ``minimal``). See :mod:`.pipeline`.
"""

from .pipeline import MODES, PreprocOptions, PreprocResult, preprocess_run, set_threads

__all__ = ["MODES", "PreprocOptions", "PreprocResult", "preprocess_run", "set_threads"]
