# plugmoe: CPU by default; for CUDA pass --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

RUN useradd --create-home --uid 1000 plugmoe
WORKDIR /app
COPY --chown=plugmoe:plugmoe . /app

# The README's setup command: torch first (CPU wheel unless TORCH_INDEX says otherwise), then plugmoe.
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir -e . \
 && mkdir -p /data/experts && chown -R plugmoe:plugmoe /data

USER plugmoe
ENV PLUGMOE_HOST=0.0.0.0 \
    PLUGMOE_PORT=8000 \
    PLUGMOE_EXPERTS_DIR=/data/experts \
    HF_HUB_OFFLINE=1
VOLUME ["/data/experts"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"
CMD ["plugmoe", "serve"]
