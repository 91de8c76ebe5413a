# Container image for the fanout server: a cached dependency layer, a release build, and a small
# non-root runtime image. Build: docker build -t fanout . ; run: docker run -p 8080:8080 fanout

# ---- build stage ---------------------------------------------------------------------------
# Same Debian release (bookworm) as the runtime image below, so the binary's glibc matches.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src

# Dependency layer: build every dependency against stub sources, so that editing src/ does not
# recompile the crates.io graph. The workspace manifest names the members benches/reference*
# (the benchmark reference servers: cargo loads every member's manifest even to build one
# binary, but compiles none of their dependencies here), the bins fanout and fanout-load and the
# bench hot_paths; cargo refuses to build while a target the manifest names has no source file,
# hence the stubs.
COPY Cargo.toml Cargo.lock ./
COPY benches/reference/Cargo.toml benches/reference/Cargo.toml
COPY benches/reference-fastwebsockets/Cargo.toml benches/reference-fastwebsockets/Cargo.toml
COPY benches/reference-axum/Cargo.toml benches/reference-axum/Cargo.toml
COPY benches/reference-actix/Cargo.toml benches/reference-actix/Cargo.toml
RUN mkdir -p src/bin/fanout-load benches/reference/src benches/reference-fastwebsockets/src \
    benches/reference-axum/src benches/reference-actix/src \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > src/bin/fanout-load/main.rs \
 && echo 'fn main() {}' > benches/reference/src/main.rs \
 && echo 'fn main() {}' > benches/reference-fastwebsockets/src/main.rs \
 && echo 'fn main() {}' > benches/reference-axum/src/main.rs \
 && echo 'fn main() {}' > benches/reference-actix/src/main.rs \
 && echo 'fn main() {}' > benches/hot_paths.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin fanout \
 && rm -rf src target/release/.fingerprint/fanout-* target/release/deps/fanout-* \
    target/release/deps/libfanout-*

# The real sources. Cargo decides freshness by mtime, and COPY keeps the (possibly older) mtimes
# of the build context, so the stale stub fingerprints were removed above rather than trusted.
COPY src src
RUN cargo build --release --locked --bin fanout \
 && install -D -m 0755 target/release/fanout /out/fanout

# ---- runtime stage -------------------------------------------------------------------------
# gcr.io/distroless/cc-debian12: glibc + libgcc + CA certificates and nothing else.
# fanout is a dynamically linked glibc binary (no OpenSSL, no other shared libraries), so "cc" is
# the smallest distroless flavour that runs it without a musl rebuild; no shell and no package
# manager means little to patch or exploit. The ":nonroot" tag runs as uid/gid 65532.
# No HEALTHCHECK: distroless has no curl/wget/shell to run one with. Kubernetes uses the HTTP
# probes on /healthz and /readyz instead (deploy/base); in compose, nginx skips a failing node.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/fanout /usr/local/bin/fanout
# Inside a container the server must listen on all interfaces; the port is the documented one.
ENV FANOUT_LISTEN=0.0.0.0:8080
EXPOSE 8080
# Numeric, not a name: Kubernetes can only verify runAsNonRoot against a numeric user.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/fanout"]
