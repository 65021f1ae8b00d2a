"""raydd: dataset distillation with diffusion models, at cluster scale (Ray Data, Ray Train, Ray Tune, MLflow)."""
from importlib import metadata

try:
    __version__ = metadata.version("raydd")       # the installed distribution's version (pyproject.toml)
except metadata.PackageNotFoundError:             # run from a source tree without installing
    __version__ = "unknown"
