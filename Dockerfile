# The operator image: slim Python, the operator extra only (no torch), non-root.
#   docker build -t ghcr.io/lmmr1/lmmr1-operator:0.1.0 .
# It installs exactly requirements/operator.txt (`make lock`) and the lmmr1 wheel, both with
# --no-deps: nothing is resolved at build time.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# The project's wheel (the build backend it downloads stays in this stage).
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
# The operator imports only the trainer's pure-pydantic config models, never torch.
COPY operator ./operator
COPY trainer_image/lmmr1_trainer ./trainer_image/lmmr1_trainer
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements/operator.txt ./requirements/
RUN pip install --no-deps --requirement requirements/operator.txt
COPY --from=wheel /wheels /wheels
RUN pip install --no-deps /wheels/lmmr1-*.whl

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="lmmr1-operator" \
      org.opencontainers.image.description="Kubernetes operator for LMM-R1 runs" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65532:65532
WORKDIR /
# The chart passes the full command (namespace scope, liveness address, log format).
ENTRYPOINT ["kopf", "run", "--module=lmmr1_operator.main"]
CMD ["--all-namespaces"]
