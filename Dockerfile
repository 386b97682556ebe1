# The one image every pipeline step and TrainJob node runs in: a CUDA PyTorch base, the
# project and its locked dependencies (kfp included: components install nothing at run time).
#
#   docker build -t REGISTRY/cyclegan-pipeline:0.1.0 .
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime ...
#   scripts/build_image.sh --base local     # no registry: a Debian base with CPU torch
#
# BASE_IMAGE needs `python` 3.11+ (the build reads pyproject.toml with tomllib) and `pip` on
# PATH, with torch and torchvision installed.
# Their torch, torchvision, triton and CUDA libraries (nvidia-cu*, -nccl, ...; not nvidia-ml-py,
# a plain dependency) are kept: those pins are filtered out of constraints.txt, so pip never
# downloads another torch build.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/cyclegan

# Dependencies first, in their own layer: it is rebuilt only when the lock or pyproject change.
# They are read from pyproject.toml itself (no package is built yet), with the `onnx` extra
# (`cyclegan export`, and the ONNX files `register` attaches); README.md and LICENSE are named
# by pyproject.toml (readme, license-files) for the project's own install below.
COPY pyproject.toml README.md LICENSE constraints.txt ./
RUN grep -viE '^(torch|torchvision|torchaudio|triton)==|^nvidia-(cu|nccl|nvjitlink|nvshmem|nvtx)' \
        constraints.txt > constraints-image.txt \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['onnx']))" \
        > requirements-image.txt \
    && pip install --no-cache-dir -c constraints-image.txt -r requirements-image.txt \
    && rm requirements-image.txt

COPY src ./src
COPY components ./components
COPY pipeline ./pipeline
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info src/*.egg-info \
    && python -c "import cyclegan, cyclegan_kfp.components, cyclegan_kfp.pipeline, kfp, mlflow, torch"

# A non-root user with uid 1000; /workspace holds the default params and local outputs
# (mlruns.db, data/). Some bases already have a uid-1000 user (Ubuntu 24.04's "ubuntu"): it
# gives way, so the uid is always ours.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN existing="$(getent passwd 1000 | cut -d: -f1)" \
    && if [ -n "$existing" ]; then userdel --remove "$existing" 2>/dev/null || userdel "$existing"; fi \
    && useradd --create-home --uid 1000 --shell /bin/bash cyclegan \
    && mkdir -p /workspace \
    && chown cyclegan:cyclegan /workspace
COPY --chown=cyclegan:cyclegan params.yaml params.paper.yaml /workspace/
USER 1000
WORKDIR /workspace

# No ENTRYPOINT: runners that set only the container's command (kfp.local's DockerRunner,
# `docker run IMAGE cyclegan train ...`) then run that command as given, as Kubernetes does.
CMD ["cyclegan", "--help"]
