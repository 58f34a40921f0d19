# nsredirect container images, two ways:
#
#   make build image                  no registry needed: packages the static binaries that
#                                     `make build` made (stages *-prebuilt, FROM scratch only)
#   docker build -t nsredirect .      from source in a Go builder stage (needs a registry)
#   docker build --target demo-backend -t nsredirect-demo-backend .
#
# The stages that need no registry come first: the classic builder (no BuildKit) runs
# every stage up to --target in file order, so they must not follow the golang one.
#
# The final images hold one static binary and nothing else (no shell, no libc), ~8 MB.
# nsredirect runs as uid 0, but its compose service drops every capability except
# BPF, NET_ADMIN, SYS_ADMIN and SYS_PTRACE: it opens the host's root-owned bpffs (0700) and
# docker socket, and other containers' /proc/PID/ns/net. As a non-root uid it would need
# DAC_OVERRIDE on top, which is more privilege, not less. The demo backend needs no
# privilege and runs as 65532.

FROM scratch AS prebuilt
COPY bin/nsredirect /usr/local/bin/nsredirect
ENV PATH=/usr/local/bin
ENTRYPOINT ["nsredirect"]
CMD ["docker"]

FROM scratch AS demo-backend-prebuilt
COPY bin/demo-backend /usr/local/bin/demo-backend
ENV PATH=/usr/local/bin
USER 65532:65532
EXPOSE 3210
ENTRYPOINT ["demo-backend"]

FROM golang:1.26-bookworm AS builder
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY cmd cmd
COPY internal internal
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X github.com/nsredirect/nsredirect/internal/cli.Version=${VERSION}" \
        -o /out/nsredirect ./cmd/nsredirect \
 && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o /out/demo-backend ./cmd/demo-backend

FROM scratch AS demo-backend
COPY --from=builder /out/demo-backend /usr/local/bin/demo-backend
ENV PATH=/usr/local/bin
USER 65532:65532
EXPOSE 3210
ENTRYPOINT ["demo-backend"]

# The default target: the same image as `prebuilt`, built from source.
FROM scratch AS nsredirect
COPY --from=builder /out/nsredirect /usr/local/bin/nsredirect
ENV PATH=/usr/local/bin
ENTRYPOINT ["nsredirect"]
CMD ["docker"]
