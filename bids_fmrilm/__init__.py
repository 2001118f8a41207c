"""bids_fmrilm: a BIDS-App for a language-aligned fMRI foundation model."""

__version__ = "0.1.0"
__all__ = ["__version__"]
