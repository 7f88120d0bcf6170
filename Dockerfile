# The riskserve image the Kubernetes manifests run (deploy/kubernetes): a release build on the
# Rust toolchain's image, copied onto a slim Debian with a non-root user (uid 10001, as the
# Deployment's securityContext expects). protos compile with protox, so no protoc is needed.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin riskserve

FROM debian:bookworm-slim
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin riskserve
COPY --from=build /src/target/release/riskserve /usr/local/bin/riskserve
USER 10001:10001
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/riskserve"]
CMD ["serve", "--listen", "0.0.0.0:50051", "--allow-plaintext"]
