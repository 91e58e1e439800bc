# Aetheris CPU image: what a Hugging Face Space (Docker SDK) builds. Serves on :7860.
#   docker build -t aetheris . && docker run -p 7860:7860 aetheris
FROM python:3.11-slim

# PyTorch's CPU wheels keep the image small; point this at a mirror if needed.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.13.0

# ---- everything below is identical in Dockerfile-nvidia ----
WORKDIR /app
# A C++ compiler: torch.compile builds the decode step's fused kernels with it at startup (on CPU; Triton uses
# the C compiler on CUDA), which is the server's default fast path.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
COPY requirements.txt .
RUN python -m pip install --no-cache-dir -r requirements.txt

# Spaces run the container as uid 1000 and need a writable HOME and Hugging Face cache. The cache folders exist
# and belong to it before a volume is mounted there (docker compose's are), or Docker would create them as root.
RUN useradd --create-home --uid 1000 user \
    && mkdir -p /home/user/.cache/huggingface /home/user/.cache/torchinductor \
    && chown -R 1000:1000 /home/user/.cache
ENV HOME=/home/user \
    HF_HOME=/home/user/.cache/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/home/user/.cache/torchinductor \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    AETHERIS_HOST=0.0.0.0 \
    AETHERIS_PORT=7860
COPY --chown=1000:1000 model/ model/
COPY --chown=1000:1000 server/ server/
COPY --chown=1000:1000 training/ training/
COPY --chown=1000:1000 aetheris/ aetheris/
COPY --chown=1000:1000 configs/ configs/
COPY --chown=1000:1000 checkpoints/ checkpoints/
USER 1000

EXPOSE 7860
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('AETHERIS_PORT', '7860'), timeout=4)"]
CMD ["python", "-m", "server"]
