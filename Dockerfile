FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins --example sample-receiver -p relay-edge -p relay-agent

FROM debian:bookworm-slim
COPY --from=build /src/target/release/relay-edge /src/target/release/relay-agent /usr/local/bin/
COPY --from=build /src/target/release/examples/sample-receiver /usr/local/bin/
USER nobody
