# The PythonTask operator. Build: docker build -t pythontask-operator:0.1.0 .
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN python -m venv /venv && /venv/bin/pip install --no-cache-dir .

FROM python:3.12-slim
LABEL org.opencontainers.image.title="pythontask-operator" \
      org.opencontainers.image.description="Runs batch Python scripts inside long-lived worker pods over non-TTY exec"
COPY --from=build /venv /venv
ENV PATH=/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["pythontask-operator", "--liveness", "http://0.0.0.0:8080/healthz"]
