"""detlib: Fast R-CNN style detectors with a pluggable box-regression loss. ``detlib.Predictor`` runs a trained one."""


def __getattr__(name: str) -> object:  # lazy: ``import detlib`` stays cheap (no torch) for the tools
    if name == "Predictor":
        from detlib.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'detlib' has no attribute {name!r}")
