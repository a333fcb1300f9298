# nnunet-node: HTTP API, DIMSE node and job workers in one process, on a CUDA-capable base.
#
#   docker build -t nnunet-node .
#   docker run --gpus all -p 12345:12345 -p 11112:11112 \
#       -v /srv/nnunet/models:/models -v /srv/nnunet/data:/data \
#       -e NNUNET_NODE_API_KEY=change-me nnunet-node
#
# The image brings the CUDA build of torch from its base (it runs on the CPU too, more slowly).
# Mount your models at /models with a model-serve-spec.yaml there (its model_folder relative to
# it), or point MODEL_SERVE_SPEC elsewhere. Everything the node writes (archive, jobs, uploads,
# SQLite database) goes to /data. Without a mounted spec the bundled demo models are served.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    nnUNet_def_n_proc=2

# dcmtk for talking to PACS by hand from inside the container (echoscu, storescu, findscu).
RUN apt-get update \
    && apt-get install -y --no-install-recommends dcmtk \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/nnunet-node
COPY pyproject.toml README.md ./
COPY core core
COPY storage storage
COPY inference inference
COPY export export
COPY pipeline pipeline
COPY node node
COPY api api
COPY alembic alembic
# nnunet_node/ links each folder above into the one import package; the wheel copies the files.
COPY nnunet_node nnunet_node
# Keep the base image's CUDA torch and torchvision: pinned, pip cannot swap them for other builds
# (an unpinned torchvision pulled in through timm would). A plain (non-editable) install: the
# migrations travel inside the package.
RUN pip freeze | grep -Ei '^(torch|torchvision)==' > /tmp/keep-torch.txt \
    && pip install -c /tmp/keep-torch.txt ".[postgresql]" \
    && rm /tmp/keep-torch.txt

# The demo models and their spec, used when nothing is mounted at /models.
COPY models /opt/nnunet-node/models
COPY model-serve-spec.yaml /opt/nnunet-node/model-serve-spec.yaml

RUN useradd --system --uid 1000 --home-dir /data nnunet \
    && mkdir -p /data /models \
    && chown nnunet /data /models
USER nnunet

# Inside a container both listen on every interface (the published ports reach them); the DICOM
# side then answers only the spec's declared peers (NNUNET_NODE_DICOM_ACCESS=auto, README
# "Access control").
ENV NNUNET_NODE_HOST=0.0.0.0 \
    NNUNET_NODE_DICOM_HOST=0.0.0.0 \
    NNUNET_SERVE_PORT=12345 \
    NNUNET_NODE_DICOM_PORT=11112 \
    NNUNET_NODE_DATA=/data \
    MODEL_SERVE_SPEC=/opt/nnunet-node/model-serve-spec.yaml \
    NNUNET_NODE_DEVICE=auto

VOLUME ["/models", "/data"]
EXPOSE 12345 11112

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('NNUNET_SERVE_PORT', '12345'), timeout=4)"

CMD ["nnunet-node", "serve"]
