# Image of the crossrank KFP components, the predictor and the drift job.
# Build: docker build -t REGISTRY/crossrank:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /app

# The CPU wheel of torch keeps the image small; the other pins come from the lock file.
COPY requirements.lock pyproject.toml README.md ./
RUN grep -v '^torch==' requirements.lock > /tmp/requirements.txt \
    && pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install -r /tmp/requirements.txt

COPY src ./src
COPY components ./components
COPY pipelines ./pipelines
COPY params.yaml dvc.yaml ./
RUN pip install --no-deps -e .

USER 1000
ENTRYPOINT ["crossrank"]
