# The PythonTask operator. Build: docker build -t pythontask-operator:0.1.0 .
# BASE_IMAGE: any image with python3 (3.11+) and its venv module. `make image` builds with buildah on the
# locally built pythontask.local/python:3-bookworm (Debian, which has python3 but no `python`).
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN python3 -m venv /venv && /venv/bin/pip install --no-cache-dir .

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="pythontask-operator" \
      org.opencontainers.image.description="Runs batch Python scripts inside long-lived worker pods over non-TTY exec"
# A passwd entry for the user: kopf names its operator after getpass.getuser(), which fails without one.
RUN groupadd --system --gid 10001 pythontask \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin pythontask
COPY --from=build /venv /venv
ENV PATH=/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["pythontask-operator", "--liveness", "http://0.0.0.0:8080/healthz"]
