"""``cyclegan_kfp``: the Kubeflow front end (this folder, ``pipeline/``, installs as it).

``cyclegan_kfp.pipeline`` is the pipeline, ``cyclegan_kfp.cli`` its commands (``cyclegan
pipeline compile | run-local | submit``), and ``cyclegan_kfp.components`` (the folder
``components/``) its steps, including the Kubeflow Trainer ``TrainJob`` launcher. Imports go one
way: pipeline -> components -> the library (``cyclegan``).
"""
