"""The Kubeflow pipeline (``pipeline.pipeline``), its CLI (``pipeline.cli``: compile, run-local,
submit) and multi-node training through Kubeflow Trainer (``pipeline.trainjob``)."""
