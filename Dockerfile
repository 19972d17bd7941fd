# syntax=docker/dockerfile:1
#
# keycard: multi-stage build.
#
#   docker build -t keycard .
#   docker run --rm -p 8080:8080 -p 9901:9901 -e KEYCARD_SECRET="$(openssl rand -base64 48)" keycard
#
# The runtime image is distroless (glibc + libgcc, no shell, no package manager) and runs as
# uid 65532. keycard needs nothing else: no OpenSSL (token crypto is RustCrypto; fetching
# [[issuers]] JWKS over https is rustls with ring and the Mozilla roots compiled in).

# ---------------------------------------------------------------------------- build
FROM rust:1-slim-bookworm AS build
WORKDIR /build
# Strip debug symbols from the release binary: a smaller image, same behaviour.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols

# Dependencies first, against a stub crate, so this layer is reused until Cargo.toml or
# Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

# The real sources. COPY keeps the files' old mtimes, which can look older than the stub's
# build output, so touch them to make sure cargo rebuilds keycard itself.
COPY build.rs ./
COPY src ./src
# `keycard --version` and `keycard_build_info` show this revision (there is no .git here):
#   docker build --build-arg KEYCARD_GIT_REV="$(git rev-parse --short=12 HEAD)" .
ARG KEYCARD_GIT_REV=unknown
RUN touch src/lib.rs src/main.rs \
 && cargo build --release --locked

# ---------------------------------------------------------------------------- runtime
FROM gcr.io/distroless/cc-debian12:nonroot

COPY --from=build /build/target/release/keycard /usr/local/bin/keycard
# Default config (the sidecar example: Redis on 127.0.0.1:6379, app on 127.0.0.1:3000, secret
# from $KEYCARD_SECRET). Mount your own over it, e.g. from a ConfigMap (deploy/kubernetes/).
COPY config/keycard.toml /etc/keycard/keycard.toml

ENV KEYCARD_CONFIG=/etc/keycard/keycard.toml
USER 65532:65532
# 8080: gateway (server.listen), 9901: /healthz /readyz /metrics (admin.listen).
EXPOSE 8080 9901

ENTRYPOINT ["/usr/local/bin/keycard"]
CMD ["run"]
