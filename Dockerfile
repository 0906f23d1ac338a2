# The `epp` image: one static-ish binary (glibc) on a distroless base, running as non-root.
#
#   docker build -t epp:dev .
#   kind load docker-image epp:dev      # or: minikube image load epp:dev / push to your registry
#
# The same image runs the picker (`epp serve`, `epp proxy`) and the simulator (`epp sim`).
# Not built in this repository's CI (no container engine there); the build below only uses
# cargo and the crates.io registry.

FROM docker.io/library/rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not refetch the registry.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
# The doctor embeds the shipped dashboard and alert rules.
COPY deploy ./deploy
RUN cargo fetch --locked
# The commit reported by llm_d_epp_info / inference_extension_info:
#   docker build --build-arg EPP_GIT_COMMIT=$(git rev-parse --short HEAD) .
ARG EPP_GIT_COMMIT=unknown
ENV EPP_GIT_COMMIT=${EPP_GIT_COMMIT}
RUN cargo build --release --locked -p epp \
 && cp target/release/epp /usr/local/bin/epp \
 && /usr/local/bin/epp --version

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/epp /usr/local/bin/epp
# 9002 ext_proc gRPC, 9003 gRPC health, 9090 metrics, 8080 HTTP probes, 8000 proxy / sim.
EXPOSE 9002 9003 9090 8080 8000
USER 65532:65532
# Charts that pass only flags (llm-d-router's, GAIE's) run `epp serve`: a command line that
# starts with a flag means serve.
ENTRYPOINT ["/usr/local/bin/epp"]
CMD ["serve", "--help"]
