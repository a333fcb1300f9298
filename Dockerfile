# nnunet-node: HTTP API, DIMSE node and job workers in one process, on a CUDA-capable base.
#
#   docker build -t nnunet-node .
#   docker run --gpus all -p 12345:12345 -p 11112:11112 \
#       -v /srv/nnunet/models:/models -v /srv/nnunet/data:/data \
#       -e MODEL_SERVE_SPEC=/models/model-serve-spec.yaml -e NNUNET_NODE_API_KEY=change-me nnunet-node
#
# The image brings the CUDA build of torch from its base (it runs on the CPU too, more slowly).
# Mount your models at /models with a model-serve-spec.yaml there (its model_folder relative to
# it) and set MODEL_SERVE_SPEC=/models/model-serve-spec.yaml: until it is set the bundled demo
# spec and models are served, whatever /models holds. Everything the node writes (archive, jobs,
# uploads, SQLite database) goes to /data, as user nnunet (uid 1000): a host folder mounted
# there must be writable by that uid (chown 1000 /srv/nnunet/data).
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

# GET /healthz on loopback, over HTTPS when NNUNET_NODE_HTTPS is set (the node's certificate is not
# checked: it names the host, not 127.0.0.1). A worker container (`nnunet-node worker`) serves no
# HTTP: docker-compose.yml turns this check off for it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import os, ssl, urllib.request; e = os.environ; tls = e.get('NNUNET_NODE_HTTPS', '').strip().lower() in ('1', 'true', 't', 'yes', 'y', 'on'); c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE; urllib.request.urlopen(('https' if tls else 'http') + '://127.0.0.1:' + e.get('NNUNET_SERVE_PORT', '12345') + '/healthz', timeout=4, context=c if tls else None)"

CMD ["nnunet-node", "serve"]
