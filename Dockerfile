# One image for every Flywheel service; compose.yaml picks the service by command.
FROM python:3.11-slim
WORKDIR /app
# torch first: set TORCH_SPEC to a CPU or CUDA build for the host.
ARG TORCH_SPEC=torch==2.13.0
RUN pip install --no-cache-dir "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
COPY flywheel ./flywheel
COPY docs ./docs
RUN pip install --no-cache-dir .
ENV FLYWHEEL_DATA_DIR=/data HF_HUB_OFFLINE=1 FLYWHEEL_HTTP_HOST=0.0.0.0
VOLUME /data
