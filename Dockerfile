# Static (musl) binaries in an empty image. Build: docker build -t relay .
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
      -p relay-edge -p relay-agent --bins --example sample-receiver

FROM scratch
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/relay-edge /usr/local/bin/relay-edge
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/relay-agent /usr/local/bin/relay-agent
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/examples/sample-receiver /usr/local/bin/sample-receiver
USER 65534:65534
