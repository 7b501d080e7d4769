# Build: docker build -t outrider .
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY config config
COPY benches benches
RUN cargo build --release --locked && strip target/release/outrider

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/outrider /usr/local/bin/outrider
COPY config/quickstart.yaml /etc/outrider/outrider.yaml
ENTRYPOINT ["/usr/local/bin/outrider"]
CMD ["run", "--config", "/etc/outrider/outrider.yaml"]
