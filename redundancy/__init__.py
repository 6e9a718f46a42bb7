"""redundancy: visual-token redundancy studies (PyramidDrop, FastV) on HF LLaVA-family models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("redundancy")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"
