# kiln — see README.md.
GO        ?= go
BIN       := bin
AGENT_DIR := imagebuild/agentbin/bin
ARCHES    := amd64 arm64
AGENTS    := $(foreach a,$(ARCHES),$(AGENT_DIR)/kiln-firstboot-linux-$(a).gz)
GOFILES   := $(shell find . -name '*.go' -not -path './test/tools/*' -not -path './test/rehearsal/*' 2>/dev/null)
# Data embedded with go:embed: a change must rebuild the binaries too.
EMBEDDED  := $(shell find manifests profiles -type f -not -name '*.go' 2>/dev/null)

.PHONY: build agents test test-arm64 oracle rehearsal rehearsal-real bench-pxe lint check demo clean

build: $(BIN)/kiln

# The agent is static (no cgo), stripped, and gzip'd reproducibly (-n):
# kiln embeds it into every node's Ignition config.
$(AGENT_DIR)/kiln-firstboot-linux-%.gz: $(GOFILES) $(EMBEDDED) go.mod go.sum
	@mkdir -p $(BIN)
	CGO_ENABLED=0 GOOS=linux GOARCH=$* $(GO) build -trimpath -ldflags '-s -w' -o $(BIN)/kiln-firstboot-linux-$* ./cmd/kiln-firstboot
	gzip -n -9 -c $(BIN)/kiln-firstboot-linux-$* > $@.tmp && mv $@.tmp $@

agents: $(AGENTS)

# kiln version names the checkout: git describe (a tag, or the short
# commit; -dirty for uncommitted changes) and the full commit. The stamp
# file changes only when they do, and then rebuilds bin/kiln.
VERSION   := $(shell git describe --tags --always --dirty 2>/dev/null || echo unknown)
COMMIT    := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
STAMP     := $(BIN)/.version
$(shell mkdir -p $(BIN); echo '$(VERSION) $(COMMIT)' | cmp -s - $(STAMP) || echo '$(VERSION) $(COMMIT)' > $(STAMP))

$(BIN)/kiln: $(AGENTS) $(GOFILES) $(EMBEDDED) go.mod go.sum $(STAMP)
	$(GO) build -trimpath -ldflags '-X main.version=$(VERSION) -X main.commit=$(COMMIT)' -o $@ ./cmd/kiln

# Fast tests: unit, golden and black-box tests of the built binaries.
test: build
	$(GO) test ./...

# The agent's pure tests, built for arm64 and run under qemu-user.
test-arm64:
	GOARCH=arm64 $(GO) test -count=1 -exec qemu-aarch64-static ./firstboot/...

# Oracle tests: real Ignition and real kubeadm (built from Go modules by
# test/tools/build.sh, cached in $$KILN_TOOLS_DIR) check what kiln renders.
oracle: build
	test/tools/build.sh
	test/tools/nm-initrd-generator.sh
	$(GO) test -tags oracle -count=1 ./test/oracle/ ./test/image/

# The real-kubeadm rehearsal (test/rehearsal, its own Go module): real
# kubeadm, API servers, controller managers, schedulers and etcd built from
# their modules, nodes as network namespaces behind HAProxy, each driven by
# the real kiln-firstboot. Root only. REHEARSAL_VERSIONS: the oldest
# verified and the newest supported Kubernetes.
REHEARSAL_VERSIONS ?= v1.34.4 v1.37.2
# First the provisioning check: per node, the real Ignition applies what a
# real kiln serve hands a PXE machine (config and air-gapped payload) to a
# root, checked entry by entry (about 40 s).
rehearsal: build
	cd test/rehearsal && $(GO) build -o ../../$(BIN)/rehearsal .
	test/tools/build.sh ignition && $(BIN)/rehearsal provision check
	for v in $(REHEARSAL_VERSIONS); do \
		test/tools/build.sh rehearsal-$$v && $(BIN)/rehearsal run -version $$v $(REHEARSAL_ARGS) || exit 1; \
	done

# The rehearsal on real nodes (containerd, runc, kubelet, CNI plugins,
# flannel; every image built locally): not in `make check` yet, its builds
# and run time do not fit CI's budget (issue 15). REAL_SCENARIOS: those
# verified on real nodes.
REAL_SCENARIOS ?= together
rehearsal-real: build
	cd test/rehearsal && $(GO) build -o ../../$(BIN)/rehearsal .
	test/tools/build.sh ignition
	for v in $(REHEARSAL_VERSIONS); do \
		test/tools/build.sh rehearsal-$$v node-$$v && $(BIN)/rehearsal run -real-nodes -version $$v $(REHEARSAL_ARGS) $(REAL_SCENARIOS) || exit 1; \
	done

# kiln serve under load next to Debian's nginx, same files, same run: 1000
# clients each fetch a script and a 64 MiB initramfs; prints the ratios.
bench-pxe: build
	$(GO) test -tags oracle -count=1 -run '^$$' -bench ServeVsNginx -benchtime 1x ./test/image/

# Everything CI runs (see .ci/run).
check: lint test test-arm64 oracle rehearsal bench-pxe

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags oracle ./test/...
	cd test/rehearsal && $(GO) vet ./...

# The main job on a fresh machine: a demo cluster in $(DEMO) (kept if it
# exists), its Kubernetes download pinned, and a ready-to-flash Flatcar
# image for the first control plane. It downloads two files once; offline,
# it uses local copies of them, found at DEMO_SYSEXT and DEMO_BASE_IMAGE,
# and says where to put them when they are missing.
DEMO            ?= demo
DEMO_SYSEXT     ?= $(DEMO)/kubernetes-sysext.raw
DEMO_BASE_IMAGE ?= $(DEMO)/flatcar_production_image.bin.bz2
FLATCAR_IMAGE_URL := https://stable.release.flatcar-linux.net/amd64-usr/current/flatcar_production_image.bin.bz2
demo: build
	test -f $(DEMO)/cluster.yaml || $(BIN)/kiln init demo --endpoint 192.168.1.50:6443 --dest $(DEMO)
	@sysext=; base=; \
	if [ -f "$(DEMO_SYSEXT)" ]; then sysext="--file kubernetes-sysext=$(DEMO_SYSEXT)"; echo "make demo: using $(DEMO_SYSEXT)"; fi; \
	if [ -f "$(DEMO_BASE_IMAGE)" ]; then base="--base-image $(DEMO_BASE_IMAGE)"; echo "make demo: using $(DEMO_BASE_IMAGE)"; fi; \
	offline() { \
		echo "make demo: a download failed (offline?). Fetch what is named below where the internet is reachable,"; \
		echo "put it here and run make demo again (it then runs offline), or set DEMO_SYSEXT and DEMO_BASE_IMAGE:"; \
		[ -n "$$1" ] && echo "  $(DEMO_SYSEXT)  the Kubernetes sysext, from the URL in kiln's message above"; \
		echo "  $(DEMO_BASE_IMAGE)  the Flatcar image, from $(FLATCAR_IMAGE_URL)"; \
	}; \
	$(BIN)/kiln -c $(DEMO)/cluster.yaml pin --arch amd64 $$sysext || { rc=$$?; [ $$rc -eq 5 ] && offline sysext; exit $$rc; }; \
	$(BIN)/kiln -c $(DEMO)/cluster.yaml build-image --role init --profile flatcar-amd64 --dest $(DEMO) --force $$base || { rc=$$?; [ $$rc -eq 5 ] && offline; exit $$rc; }

clean:
	rm -rf $(BIN) $(AGENT_DIR)/*.gz
