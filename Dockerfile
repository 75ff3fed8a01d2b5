# celeriac: the worker image (also runs `celeriac beat` and `celeriac api`).
#   podman build -t celeriac .        (or docker build)
# The build stage installs the toolchain that rust-toolchain.toml pins, with wasm32-wasip2, and
# builds the host and the example task components. The runtime stage is a slim Debian with the
# binary, the components and a non-root user.
#
# Base images are build arguments, so a machine without a registry can use local ones:
#   podman build --build-arg BUILD_BASE=localhost/debian-base:bookworm \
#                --build-arg RUNTIME_BASE=localhost/debian-base:bookworm -t celeriac .
ARG BUILD_BASE=debian:bookworm
ARG RUNTIME_BASE=debian:bookworm-slim

FROM ${BUILD_BASE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates curl gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
# rustup itself, straight from static.rust-lang.org; the toolchain comes from
# rust-toolchain.toml below.
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
RUN curl --proto '=https' --tlsv1.2 -sSf -o /tmp/rustup-init \
      https://static.rust-lang.org/rustup/dist/x86_64-unknown-linux-gnu/rustup-init \
 && chmod +x /tmp/rustup-init \
 && /tmp/rustup-init -y --no-modify-path --profile minimal --default-toolchain none \
 && rm /tmp/rustup-init
WORKDIR /src
COPY rust-toolchain.toml ./
RUN rustup toolchain install --profile minimal \
 && rustup target add wasm32-wasip2
COPY . .
RUN cargo build --release --locked -p celeriac \
 && mkdir -p /out/modules \
 && cp target/release/celeriac /out/ \
 && strip --strip-debug /out/celeriac \
 && cp target/tasks/*.wasm /out/modules/

FROM ${RUNTIME_BASE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates tzdata \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/celeriac --create-home \
      --shell /usr/sbin/nologin celeriac \
 && mkdir -p /var/lib/celeriac/modules /var/cache/celeriac /etc/celeriac \
 && chown -R celeriac:celeriac /var/lib/celeriac /var/cache/celeriac
COPY --from=build /out/celeriac /usr/local/bin/celeriac
COPY --from=build --chown=celeriac:celeriac /out/modules/ /var/lib/celeriac/modules/
COPY deploy/celeriac.container.toml /etc/celeriac/celeriac.toml
# Broker and result URLs come from the environment (CELERY_BROKER_URL, CELERY_RESULT_BACKEND).
ENV CELERIAC_CONFIG=/etc/celeriac/celeriac.toml \
    CELERIAC_CACHE=/var/cache/celeriac \
    CELERIAC_LOG=warn
USER celeriac
WORKDIR /var/lib/celeriac
# The modules folder (deploy a task by putting its .wasm here; workers watch it) and the
# compiled-module cache (kept, a restart does not compile again).
VOLUME ["/var/lib/celeriac/modules", "/var/cache/celeriac"]
# Configuration, modules and Redis: what `worker --check` checks; it runs no task.
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 \
  CMD ["celeriac", "worker", "--check"]
ENTRYPOINT ["celeriac"]
CMD ["worker"]
