# The runtime and the example guests in one image (used by examples/compose). Multi-stage:
# the build stage runs scripts/build-release.sh (which CI also runs, without Docker), the
# final stage is a slim Debian with the binary and the components.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN scripts/build-release.sh /out

FROM debian:bookworm-slim
COPY --from=build /out/runtime /usr/local/bin/runtime
COPY --from=build /out/guests/ /opt/saga/guests/
ENV SAGA_HTTP_LISTEN=0.0.0.0:8088 \
    SAGA_CACHE_DIR=/var/cache/saga
EXPOSE 8088
ENTRYPOINT ["runtime"]
CMD ["run"]
