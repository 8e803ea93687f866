# Strongroom proxy image. Build: docker build -t strongroom .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY keys ./keys
COPY config ./config
RUN pip install . \
    && groupadd --system --gid 10001 strongroom \
    && useradd --system --uid 10001 --gid strongroom --home-dir /var/lib/strongroom \
       --shell /usr/sbin/nologin strongroom \
    && mkdir -p /etc/strongroom /var/lib/strongroom/keys /var/log/strongroom \
    && chown -R strongroom:strongroom /var/lib/strongroom /var/log/strongroom

# settings.SCHEMA_PATH is resolved relative to the source tree (config/ beside proxy/), which
# an installed wheel does not have; keep /src first on the path until the schema ships as
# package data.
ENV PYTHONPATH=/src

USER strongroom
WORKDIR /var/lib/strongroom

# 6432: PostgreSQL protocol (listen.port); 9187: Prometheus /metrics (metrics.port).
EXPOSE 6432 9187

ENTRYPOINT ["strongroom", "serve", "--config", "/etc/strongroom/strongroom.yaml"]
