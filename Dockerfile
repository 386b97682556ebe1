# The one image every pipeline step and TrainJob node runs in: a CUDA PyTorch base, the
# project and its locked dependencies (kfp included: components install nothing at run time).
#
#   docker build -t REGISTRY/cyclegan-pipeline:0.1.0 .
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime ...
#
# The base image's torch, torchvision, triton and CUDA libraries are kept: their pins are
# filtered out of constraints.txt, so pip never downloads another torch build.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/cyclegan

# Dependencies first, in their own layer: it is rebuilt only when the lock or pyproject change.
# Empty package stubs let pip resolve the project's dependencies before the code is copied.
COPY pyproject.toml README.md constraints.txt ./
RUN grep -viE '^(torch|torchvision|torchaudio|triton)==|^nvidia-' constraints.txt > constraints-image.txt \
    && mkdir -p src/cyclegan components pipeline \
    && touch src/cyclegan/__init__.py components/__init__.py pipeline/__init__.py \
    && pip install --no-cache-dir -c constraints-image.txt . \
    && pip uninstall --yes cyclegan-pipeline \
    && rm -rf src components pipeline build

COPY src ./src
COPY components ./components
COPY pipeline ./pipeline
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build \
    && python -c "import cyclegan, components, pipeline, kfp, mlflow, torch"

# A non-root user; /workspace holds the default params and local outputs (mlruns.db, data/).
RUN useradd --create-home --uid 1000 --shell /bin/bash cyclegan \
    && mkdir -p /workspace \
    && chown cyclegan:cyclegan /workspace
COPY --chown=cyclegan:cyclegan params.yaml params.paper.yaml /workspace/
USER 1000
WORKDIR /workspace

# Kubeflow's lightweight components replace the entry point with their own command.
ENTRYPOINT ["cyclegan"]
CMD ["--help"]
