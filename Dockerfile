# CollectionLoRA Studio. CPU by default; for CUDA build with e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 -t studio .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
RUN if ! command -v python3 >/dev/null; then apt-get update && apt-get install -y --no-install-recommends python3 python3-pip && rm -rf /var/lib/apt/lists/*; fi
WORKDIR /app
COPY requirements.txt .
RUN python3 -m pip install --no-cache-dir -r requirements.txt
COPY . .
ENV STUDIO_DATA_DIR=/data
VOLUME /data
EXPOSE 7860
# Binding beyond loopback needs auth: pass STUDIO_AUTH=user:password at `docker run`.
CMD ["python3", "app.py", "--host", "0.0.0.0", "--port", "7860"]
