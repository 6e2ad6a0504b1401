"""hpo-sync: a local, queryable history of PAI AutoML hyperparameter-optimisation experiments."""

__version__ = "0.1.0"
