# syntax=docker/dockerfile:1
# trioproxy container image.
#
#   docker build -t trioproxy .
#   docker run --rm -p 11434:11434 trioproxy --demo                  # built-in demo backend
#   docker run --rm -p 11434:11434 -e OPENAI_API_BASE_URL=http://host:8000/v1 \
#       -e OPENAI_API_KEY=sk-... trioproxy                          # a real backend
#
# Arguments that start with "-" are passed to `trioproxy`; anything else runs as a command
# (e.g. `docker run --rm -it trioproxy python`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The build context is filtered by .dockerignore to what `pip install` needs.
COPY . /src
RUN pip install /src \
    && rm -rf /src \
    && groupadd --system --gid 10001 trioproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin trioproxy

# Inside a container the proxy must listen on all interfaces (its default is 127.0.0.1).
ENV PROXY_HOST=0.0.0.0 \
    PROXY_PORT=11434

WORKDIR /tmp
# Numeric, so Kubernetes' runAsNonRoot can verify it (deploy/k8s/deployment.yaml).
USER 10001:10001
EXPOSE 11434

# The slim image has no curl: the package's probe asks /health with the standard library,
# where the proxy listens by its own settings (PROXY_PORT, https with TLS_CERTFILE); exit 1
# on a refused connection or any answer that is not 2xx. Set the port with PROXY_PORT,
# not --port: the probe cannot see the command line.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-m", "trioproxy.probe"]

ENTRYPOINT ["/bin/sh", "-c", "if [ \"${1#-}\" != \"$1\" ]; then set -- trioproxy \"$@\"; fi; exec \"$@\"", "trioproxy-entrypoint"]
CMD ["trioproxy"]
