# Strongroom proxy image. Build: docker build -t strongroom .
# Run: see docker-compose.yml. The entrypoint creates the local KEK, the keyring and the
# audit key on first start (on the /var/lib/strongroom/keys volume), then execs
# `strongroom serve --config $STRONGROOM_CONFIG`.
FROM python:3.11.9-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY keys ./keys
COPY config ./config
# An ordinary install: the configuration schema ships inside the package, so nothing at
# run time needs /src (removed below).
RUN pip install . \
    && groupadd --system --gid 10001 strongroom \
    && useradd --system --uid 10001 --gid strongroom --home-dir /var/lib/strongroom \
       --shell /usr/sbin/nologin strongroom \
    && mkdir -p /etc/strongroom /var/lib/strongroom/keys /var/log/strongroom \
    && chown -R strongroom:strongroom /var/lib/strongroom /var/log/strongroom \
    && chmod 0700 /var/lib/strongroom/keys /var/log/strongroom \
    && rm -rf /src
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/strongroom-entrypoint

ENV STRONGROOM_CONFIG=/etc/strongroom/strongroom.yaml \
    STRONGROOM_HEALTH_URL=http://127.0.0.1:9187/healthz

USER strongroom
WORKDIR /var/lib/strongroom

# 6432: PostgreSQL protocol (listen.port); 9187: Prometheus /metrics and /healthz (metrics.port).
EXPOSE 6432 9187

# 200 from /healthz while the proxy serves (it turns 503 during a shutdown).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(os.environ['STRONGROOM_HEALTH_URL'], timeout=2)"

ENTRYPOINT ["strongroom-entrypoint"]
