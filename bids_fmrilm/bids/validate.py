"""BIDS validation of the input dataset with the official validator (``bids-validator-deno``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import ValidationError


def validator_command() -> list[str] | None:
    """The validator executable, preferring the one installed next to this Python."""
    local = Path(sys.executable).parent / "bids-validator-deno"
    if local.exists():
        return [str(local)]
    exe = shutil.which("bids-validator-deno")
    return [exe] if exe else None


def validate_dataset(bids_dir: str | Path, ignore_codes: tuple[str, ...] = ()) -> list[dict]:
    """Run the BIDS validator; raise on errors, return the warnings.

    Parameters
    ----------
    bids_dir : path
        Dataset root.
    ignore_codes : tuple of str
        Issue codes to disregard (e.g. ``NOT_INCLUDED`` for suffixes listed in ``.bidsignore``).

    Raises
    ------
    ValidationError
        With the first errors and their files, and the ``--skip-bids-validation`` hint.
    """
    cmd = validator_command()
    if cmd is None:
        raise ValidationError("bids-validator-deno is not installed", fix="pip install bids-validator-deno, or pass --skip-bids-validation")
    proc = subprocess.run(cmd + [str(bids_dir), "--format", "json", "--ignoreNiftiHeaders"],
                          capture_output=True, text=True, timeout=600)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise ValidationError(f"the validator failed: {(proc.stderr or proc.stdout).strip()[:300]}", path=bids_dir,
                              fix="pass --skip-bids-validation to proceed without validation") from None
    issues = report.get("issues", {}).get("issues", [])
    errors = [i for i in issues if i.get("severity") == "error" and i.get("code") not in ignore_codes]
    if errors:
        shown = "; ".join(f"{e.get('code')} at {e.get('location', '?')}" for e in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise ValidationError(f"BIDS validation found {len(errors)} error(s): {shown}{more}", path=bids_dir,
                              fix="fix the dataset, or pass --skip-bids-validation")
    return [i for i in issues if i.get("severity") == "warning"]
