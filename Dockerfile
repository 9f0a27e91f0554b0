# syntax=docker/dockerfile:1
# adscore serving image (CPU): the wheel and its serving dependencies only, no torch, no tests.
#   docker build -t adscore:0.1.0 .
#   docker build --build-arg BAKE_DEMO_MODEL=true -t adscore:demo .   # demo model baked in
# deploy/docker/smoke.sh performs these same install steps and starts the service the same way.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY models ./models
COPY feature_client ./feature_client
RUN python -m venv /opt/adscore \
    && /opt/adscore/bin/pip install --no-compile build==1.2.2 \
    && /opt/adscore/bin/python -m build --wheel --outdir /wheels . \
    && /opt/adscore/bin/pip uninstall -y build pyproject_hooks packaging \
    && /opt/adscore/bin/pip install --no-compile /wheels/*.whl

FROM ${PYTHON_IMAGE} AS runtime
ARG BAKE_DEMO_MODEL=false
ENV PATH=/opt/adscore/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ADSCORE_HOST=0.0.0.0 \
    ADSCORE_PORT=8000 \
    ADSCORE_MODEL_REPOSITORY=/models
RUN groupadd --system --gid 10001 adscore \
    && useradd --system --uid 10001 --gid adscore --no-create-home --shell /usr/sbin/nologin adscore
COPY --from=build /opt/adscore /opt/adscore
# The model repository is a mounted volume; BAKE_DEMO_MODEL=true copies the demo model in.
COPY demo/model_repository /opt/adscore-demo-models
RUN if [ "$BAKE_DEMO_MODEL" = "true" ]; then cp -r /opt/adscore-demo-models /models; \
    else mkdir /models; fi \
    && rm -rf /opt/adscore-demo-models \
    && chown -R adscore:adscore /models
USER 10001:10001
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=2s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
# One uvicorn process (exec form: it is PID 1 and gets SIGTERM for a graceful drain).
CMD ["adscore", "serve"]
