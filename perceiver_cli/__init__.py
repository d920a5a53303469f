"""perceiver: fill masked text with DeepMind's byte-level Perceiver IO language model.

`import perceiver_cli` stays light: torch is imported only when the API is used.
"""

__version__ = "0.1.0"
__all__ = ["MaskFiller", "FillResult", "__version__"]


def __getattr__(name):
    if name in ("MaskFiller", "FillResult"):
        from . import filler

        return getattr(filler, name)
    raise AttributeError(name)
