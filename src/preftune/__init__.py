"""preftune: align language models with human preferences, as Kubeflow Pipelines components."""

__version__ = "0.1.0"
