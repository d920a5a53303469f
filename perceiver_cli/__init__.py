"""perceiver: fill masked text with DeepMind's byte-level Perceiver IO language model.

`import perceiver_cli` stays light: torch is imported only when `MaskFiller` is used.
"""

__version__ = "0.1.0"
__all__ = ["MaskFiller", "FillOptions", "LoadOptions", "FillResult", "__version__"]


def __getattr__(name):
    if name == "MaskFiller":
        from .filler import MaskFiller

        return MaskFiller
    if name in ("FillOptions", "LoadOptions"):
        from . import options

        return getattr(options, name)
    if name == "FillResult":
        from .results import FillResult

        return FillResult
    raise AttributeError(name)
