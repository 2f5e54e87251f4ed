# One image for the API, every worker pool, beat and Flower (the command picks the role).
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends poppler-utils tesseract-ocr libmagic1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# CPU-only torch first, so nothing pulls CUDA packages. TORCH_INDEX_URL may point at a
# CPU wheel index (PyTorch publishes one); empty uses the default index.
ARG TORCH_INDEX_URL=""
RUN pip install --no-cache-dir torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
COPY pyproject.toml constraints.txt README.md ./
COPY api api
COPY workers workers
COPY tasks tasks
COPY pipelines pipelines
COPY models models
COPY migrations migrations
COPY sluice sluice
COPY celeryconfig.py alembic.ini ./
RUN sed -i '/^torch==/d' constraints.txt \
 && pip install --no-cache-dir -c constraints.txt ".[api,worker]" \
 && pip uninstall -y torchvision timm

ENV SLUICE_DATA_DIR=/data HF_HUB_OFFLINE=1
RUN useradd --create-home sluice && mkdir -p /data && chown sluice /data
USER sluice
EXPOSE 8000
CMD ["uvicorn", "api.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
