# nsredirect: build, generate, test, demo. `sudo make test` and `sudo make demo`
# work on a fresh Debian machine: both install what they need through `deps`.
SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/nsredirect/nsredirect/internal/cli.Version=$(VERSION)
BIN := bin/nsredirect
# Caches outside the checkout, shared by every clone on the machine: Debian
# kernels, apt indexes, built Go tools and engines, keyed by what they are
# built from. NSREDIRECT_TEST_CACHE moves it (the guests' own /tmp and /run
# hide those: use e.g. /var/tmp/...).
NSREDIRECT_TEST_CACHE ?= /var/cache/nsredirect-test
override NSREDIRECT_TEST_CACHE := $(abspath $(NSREDIRECT_TEST_CACHE))
export NSREDIRECT_TEST_CACHE
STATICCHECK = $$(scripts/gotool.sh honnef.co/go/tools/cmd/staticcheck@v0.8.2)
DEB_PACKAGES := clang-14 llvm-14 libbpf-dev bpftool iproute2 curl socat dnsutils wrk iperf3 iptables docker.io docker-compose util-linux libcap2-bin mkdocs mkdocs-material

.PHONY: deps-kernels deps-runtimes deps-actionlint deps-kube
.PHONY: all build generate check-generate docs test test-unit test-privileged test-deploy demo deps lint bench bench-quick bench-scale image test-docker clean soak test-kernels test-runtimes-kube

all: build

build: $(BIN) bin/demo-backend

$(BIN): $(shell find cmd internal -name '*.go') internal/bpfobj/redirect_bpfel.o go.mod go.sum
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $@ ./cmd/nsredirect

bin/demo-backend: $(shell find cmd/demo-backend -name '*.go')
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '-s -w' -o $@ ./cmd/demo-backend

# Installs the Debian packages the tests, demo and benchmark use, and the
# compiler internal/bpfobj/gen.go pins (clang-14, llvm-strip-14: Debian 12's
# clang-14 and llvm-14), so `make check-generate` builds with it. Installs
# only what dpkg says is missing: a second run is one dpkg-query.
deps:
	@scripts/need-packages.sh deps $(DEB_PACKAGES)

# Regenerates the eBPF objects and Go bindings, and the references the code
# gives about itself (docs/cli.md from the commands' flags, docs/metrics.md
# from the metrics collector: internal/docgen). They are committed, and CI
# checks this reproduces them byte for byte. The compiler is pinned in
# internal/bpfobj/gen.go and the headers are vendored in bpf/include, so the
# output is the same on any machine.
GENERATED := internal/bpfobj docs/cli.md docs/metrics.md
generate:
	cd internal/bpfobj && $(GO) generate ./...
	$(GO) generate ./internal/docgen

check-generate: generate
	@git diff --exit-code -- $(GENERATED) || { echo "check-generate: the files above differ from what \`make generate\` writes: run it and commit them" >&2; exit 1; }
	@test -z "$$(git status --porcelain -- $(GENERATED))" || { git status --porcelain -- $(GENERATED); echo "check-generate: files above are not committed" >&2; exit 1; }

# The manual as a site (mkdocs and mkdocs-material from Debian, through
# `make deps`) into site/, with --strict so a link to a missing page fails;
# then scripts/check-docs.sh: every page of docs/ is in mkdocs.yml's nav
# (mkdocs 1.4 only logs one that is not), every relative link of README.md
# resolves, and every #anchor between pages names a heading (1.4 does not
# look).
docs:
	@scripts/need-packages.sh docs mkdocs mkdocs-material
	mkdocs build --strict --site-dir site
	scripts/check-docs.sh

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting" >&2; exit 1; }
	$(GO) vet ./...
	sc=$(STATICCHECK) && $$sc ./...
	cd test/deploy && $(GO) vet ./...
	sc=$(STATICCHECK) && cd test/deploy && $$sc ./...

# Everything: unit tests (with the fuzz seed corpora) under the race
# detector, then the privileged suites against the real kernel, in
# namespaces the tests create. Under CI=true privileged tests fail, never skip.
test: deps build
	NSREDIRECT_BIN=$(CURDIR)/$(BIN) DEMO_BACKEND_BIN=$(CURDIR)/bin/demo-backend \
		$(GO) test -count=1 -race $$($(GO) list ./... | grep -v /test/)
	$(MAKE) --no-print-directory test-deploy
	NSREDIRECT_BIN=$(CURDIR)/$(BIN) DEMO_BACKEND_BIN=$(CURDIR)/bin/demo-backend \
		$(GO) test -count=1 -p 1 -v -timeout 40m ./test/...

test-unit:
	$(GO) test -count=1 ./internal/... ./cmd/...

# The Kubernetes manifests and the Helm chart, with no cluster: built
# in-process as `kubectl apply -k` and `helm install` would, decoded strictly
# into k8s.io/api types and checked field by field, and their flags checked
# against `bin/nsredirect kube`. Its own module (test/deploy/go.mod), so helm
# and kustomize stay out of the daemon's go.mod. The Prometheus rules go
# through `promtool check rules` and `promtool test rules`, with the promtool
# of Debian's prometheus package, extracted without installing the server.
test-deploy: $(BIN)
	promtool=$$(scripts/promtool.sh) && cd test/deploy && \
		NSREDIRECT_BIN=$(CURDIR)/$(BIN) PROMTOOL=$$promtool $(GO) test -count=1 ./...

demo: deps build
	./scripts/demo.sh

clean:
	rm -rf bin .cache site

# The two fuzz targets, bounded by count (not by -fuzztime=DURATION: Go
# 1.26's fuzz coordinator can report its own wall-clock deadline as a
# failure with no crasher, golang/go#75804, fixed in 1.27); -timeout caps a
# hang. `fuzz` is the gate's (200,000 executions each), `fuzz-full` the
# test-all cell's (2,000,000 each).
FUZZ_EXECS ?= 200000
.PHONY: fuzz fuzz-full
fuzz:
	$(GO) test ./internal/rule -run=NONE -fuzz='^FuzzParse$$' -fuzztime=$(FUZZ_EXECS)x -timeout=10m
	$(GO) test ./internal/rule -run=NONE -fuzz='^FuzzParseList$$' -fuzztime=$(FUZZ_EXECS)x -timeout=10m

fuzz-full:
	$(MAKE) --no-print-directory fuzz FUZZ_EXECS=2000000

# Every cell the gate (.ci/run) does not run, each under its own bound, one
# after the other; a cell that fails or hangs is named and the others still
# run. CELLS="kernel-6.1 soak" runs some (test-all-list lists them). Writes
# test/results/record.json and README.md: commit them with the change that
# ran the cells. Exits non-zero if a cell failed.
.PHONY: test-all test-all-list
test-all: deps build
	$(GO) run ./tools/testall $(if $(CELLS),-cells '$(CELLS)')

test-all-list:
	@$(GO) run ./tools/testall -list

# The cells docs/development.md's table asks of the changes since SINCE
# (default origin/main, else main).
SINCE ?= $(shell git rev-parse -q --verify origin/main >/dev/null && echo origin/main || echo main)
.PHONY: test-changed
test-changed: deps build
	$(GO) run ./tools/testall -since '$(SINCE)'

# Minutes of connect load in 20 netns with daemons killed and restarted and
# netns coming and going (NSREDIRECT_SOAK_DURATION, default 5m).
# Direct vs nsredirect vs socat vs iptables REDIRECT, in throwaway netns on
# loopback; writes bench/results/latest.{md,png}. bench-quick: < 1 minute.
bench: deps build
	$(GO) run ./bench

bench-quick: deps build
	$(GO) run ./bench --quick

# The daemon at node scale: CPU and RSS idle and under churn for kube (110
# pods, 5,000 processes), docker (200 containers) and run, and start-to-
# redirect with 50 starting at once (~3 minutes; prints the table).
bench-scale: deps build
	$(GO) run ./bench --only scale

soak: deps build
	NSREDIRECT_BIN=$(CURDIR)/$(BIN) DEMO_BACKEND_BIN=$(CURDIR)/bin/demo-backend \
		$(GO) test -count=1 -tags soak -v -timeout 20m ./test/soak/

# Container images from the binaries `make build` made: FROM scratch only, no
# registry needed (dockerd must be running). `docker build .` builds from source.
IMAGE ?= nsredirect:latest
DEMO_IMAGE ?= nsredirect-demo-backend:latest
image: build
	docker build --target prebuilt -t $(IMAGE) .
	docker build --target demo-backend-prebuilt -t $(DEMO_IMAGE) .
	@# What a user pulls or loads: the `docker save` archive. (`docker image
	@# inspect .Size` is not that: Docker 29's containerd image store reports
	@# the unpacked snapshot, 20.10 the layer sum.)
	@size=$$(set -o pipefail; docker save $(IMAGE) | wc -c) || { echo "docker save $(IMAGE) failed" >&2; exit 1; }; \
		echo "$(IMAGE): $$((size / 1000000)) MB (docker save)"; \
		test $$size -lt 25000000 || { echo "image $(IMAGE): docker save is $$size bytes; it must stay under 25 MB" >&2; exit 1; }

# The Docker suite alone (starts dockerd if it is not running).
test-docker: deps build
	NSREDIRECT_BIN=$(CURDIR)/$(BIN) DEMO_BACKEND_BIN=$(CURDIR)/bin/demo-backend \
		$(GO) test -count=1 -v -timeout 10m ./test/docker/

# The privileged suite on Debian's 5.10, 6.1 and 6.12 kernels under qemu
# (TCG, no KVM needed): one table, also in $NSREDIRECT_TEST_CACHE/kernels/results.md.
# KERNELS="6.1" and RUN=REGEX narrow it; KERNELS="arm64-6.1 arm64-6.12"
# boots Debian's arm64 kernels under qemu-system-aarch64 with the suite
# built for arm64; see scripts/test-kernels.sh.
KERNELS_PACKAGES := qemu-system-x86 qemu-system-arm busybox-static
KERNELS ?= 5.10 6.1 6.12
test-kernels: deps build deps-kernels
	./scripts/test-kernels.sh --repo $(CURDIR) --kernels "$(KERNELS)" $(if $(RUN),--run '$(RUN)')

deps-kernels:
	@scripts/need-packages.sh test-kernels $(KERNELS_PACKAGES)

# Real container engines on this host: Docker Engine 29 (dockerd from the
# moby/moby/v2 module) with Docker Compose v5 (as the `docker compose` plugin
# and as `docker-compose`), and Podman's Docker-compatible API (Debian's 4.3),
# each on its own socket, data root and exec root; one table, also in
# $NSREDIRECT_TEST_CACHE/runtimes/results.md. The engines are built from the
# Go modules pinned in test/runtimes/tools/ by its build.sh, into the test
# cache, keyed by those modules (a second run builds nothing). RUN=REGEX
# narrows the tests.
.PHONY: test-runtimes
RUNTIMES_PACKAGES := podman uidmap passwd containerd runc
test-runtimes: deps build deps-runtimes
	$(GO) vet -tags runtimes ./test/runtimes/
	@mkdir -p $(NSREDIRECT_TEST_CACHE)/runtimes
	rbin=$$(test/runtimes/tools/build.sh) && \
		NSREDIRECT_BIN=$(CURDIR)/$(BIN) DEMO_BACKEND_BIN=$(CURDIR)/bin/demo-backend \
		NSREDIRECT_RUNTIMES_BIN=$$rbin NSREDIRECT_RUNTIMES_RESULTS=$(NSREDIRECT_TEST_CACHE)/runtimes/results.md \
		$(GO) test -tags runtimes -count=1 -p 1 -v -timeout 30m $(if $(RUN),-run '$(RUN)') ./test/runtimes/
	@cat $(NSREDIRECT_TEST_CACHE)/runtimes/results.md

# The pure-cgroup2 column of the same matrix: a qemu guest (Debian's 6.12,
# TCG, as `make test-kernels` boots it) that runs systemd as PID 1 on a pure
# cgroup2 hierarchy, with Docker Engine 29 + compose v5 and the shipped
# systemd unit installed as docs/docker.md says; one table, also in
# $NSREDIRECT_TEST_CACHE/kernels/results-runtimes.md. RUN=REGEX narrows the tests.
.PHONY: test-runtimes-guest
test-runtimes-guest: deps build deps-kernels deps-runtimes
	$(GO) vet -tags 'runtimes guest' ./test/runtimes/
	rbin=$$(test/runtimes/tools/build.sh) && NSREDIRECT_RUNTIMES_BIN=$$rbin \
		./scripts/test-kernels.sh --runtimes --repo $(CURDIR) --kernels 6.12 $(if $(RUN),--run '$(RUN)')

deps-runtimes:
	@scripts/need-packages.sh test-runtimes $(RUNTIMES_PACKAGES)

# Release artifacts for linux/amd64 and linux/arm64 in dist/, offline and
# reproducible (tools/release, its own module so nfpm and go-containerregistry
# stay out of the daemon's go.mod): tarballs, .debs, image tarballs and the
# multi-arch OCI index, an SPDX SBOM and SHA256SUMS. Same VERSION, commit and
# Go toolchain, same bytes: the toolchain is the one go.mod names, exactly
# (its go line, or a toolchain line), and tools/release refuses any other
# (exit 2) rather than let GOTOOLCHAIN fetch one. release-check builds twice
# and compares (TestRelease/Reproducible).
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
.PHONY: release release-check
release:
	@case "$(VERSION)" in v[0-9]*.[0-9]*.[0-9]*) ;; *) echo "make release: VERSION=$(VERSION): give a semantic version, e.g. make release VERSION=v1.2.3" >&2; exit 2 ;; esac
	cd tools/release && GOTOOLCHAIN=local SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) $(GO) run . -repo $(CURDIR) -version $(VERSION) -out $(CURDIR)/dist
	cd dist && sha256sum -c --quiet SHA256SUMS

release-check:
	sc=$(STATICCHECK) && cd tools/release && $(GO) vet ./... && $$sc ./...
	cd tools/release && NSREDIRECT_REPO=$(CURDIR) $(GO) test -count=1 -v -timeout 20m ./...

# The GitHub workflows cannot run here; actionlint (built from its Go
# module) at least checks they are valid, and their `run:` scripts through
# shellcheck (Debian's). actionlint skips that check silently when
# shellcheck is missing, so the target installs it and names it.
ACTIONLINT := github.com/rhysd/actionlint/cmd/actionlint@v1.7.12
ACTIONLINT_PACKAGES := shellcheck
.PHONY: actionlint
actionlint: deps-actionlint
	"$$(scripts/gotool.sh $(ACTIONLINT))" -no-color -shellcheck "$$(command -v shellcheck)" .github/workflows/*.yml

deps-actionlint:
	@scripts/need-packages.sh actionlint $(ACTIONLINT_PACKAGES)

# A real single-node Kubernetes v1.37.2 (etcd from Debian; apiserver,
# controller-manager, scheduler, kubelet and kubectl built from
# k8s.io/kubernetes in test/runtimes/kubernetes/go.mod, helm from
# test/deploy's; containerd 1.6, runc and the CNI plugins from Debian), and
# nsredirect installed on it with `kubectl apply -k` and `helm install` as
# docs/kubernetes.md says. Builds are cached in the test cache, keyed by the
# modules they come from (test/runtimes/kubernetes/build.sh). Its table:
# $NSREDIRECT_TEST_CACHE/kubernetes/results.md; a failed run's logs:
# $NSREDIRECT_TEST_CACHE/kubernetes/logs.
KUBE_PACKAGES := containerd runc containernetworking-plugins openssl bpftool python3
test-runtimes-kube: deps build deps-kube
	kbin=$$(test/runtimes/kubernetes/build.sh) && \
		test/runtimes/kubernetes/cluster.sh --repo $(CURDIR) --bin $$kbin --tools $$kbin/images

# The same cell in the pure-cgroup2 column: a qemu 6.12 guest (TCG) booting
# systemd as PID 1, with kubelet and containerd on the systemd cgroup driver
# (kubelet's supported path); the binaries are the ones test-runtimes-kube
# builds. Its table: $NSREDIRECT_TEST_CACHE/kernels/results-kube.md.
.PHONY: test-runtimes-guest-kube
test-runtimes-guest-kube: deps build deps-kernels deps-kube
	kbin=$$(test/runtimes/kubernetes/build.sh) && NSREDIRECT_KUBE_BIN=$$kbin \
		./scripts/test-kernels.sh --kube --repo $(CURDIR) --kernels 6.12

deps-kube:
	@scripts/need-packages.sh test-runtimes-kube $(KUBE_PACKAGES)
