# syntax=docker/dockerfile:1
#
# kluis container image: build the release binary in the official Rust image, run it as a
# non-root user on Debian slim. Build:  docker build -t kluis .
# Run:    docker run -p 50051:50051 -v kluis-data:/var/lib/kluis kluis
# The operator token is written to /var/lib/kluis/operator.token on first start.

# ---- builder ---------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src

# build.rs compiles proto/ with the protoc shipped in the protoc-bin-vendored crate, and SQLite is
# bundled by sqlx: the builder needs nothing beyond the Rust image.
COPY . .

# Cache mounts keep the crates.io registry and target/ between builds (BuildKit); the binary is
# copied out of the cached target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin kluis \
    && install -D -m 0755 target/release/kluis /out/kluis

# ---- runtime ---------------------------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: roots for TLS to PostgreSQL and other hosts. Versions unpinned on purpose,
# see .hadolint.yaml.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 kluis \
    && useradd --system --uid 10001 --gid kluis --home-dir /var/lib/kluis \
        --no-create-home --shell /usr/sbin/nologin kluis \
    && install -d -m 0700 -o kluis -g kluis /var/lib/kluis

COPY --from=builder /out/kluis /usr/local/bin/kluis

# Plaintext gRPC on the container's address (KLUIS_INSECURE, logged as a warning): publish the port
# only to a TLS-terminating proxy on a network you trust.
# Prometheus metrics on their own port (plain HTTP, no personal data): publish it to the monitoring
# network only. For TLS in the container itself, mount a certificate and set KLUIS_TLS_CERT and
# KLUIS_TLS_KEY (KLUIS_INSECURE is then not needed) and KLUIS_HEALTH_CA for the health check.
ENV KLUIS_DATA_DIR=/var/lib/kluis \
    KLUIS_LISTEN=0.0.0.0:50051 \
    KLUIS_INSECURE=true \
    KLUIS_METRICS_LISTEN=0.0.0.0:9464

# Declared after the directory is created and chowned, so a new volume starts owned by kluis.
VOLUME /var/lib/kluis
WORKDIR /var/lib/kluis
USER 10001:10001
EXPOSE 50051 9464

HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["kluis", "health"]

ENTRYPOINT ["kluis"]
CMD ["serve"]
