"""The package version (one place: ``dspy_infra.__version__`` and the health answers read it)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
