# Caracal's verbs. Every setup step a fresh machine needs lives here and is idempotent.
#
#   make test          set up what is missing (control plane, kubelet/containerd/runc, images), then lint and run every test tier
#   make lab           run Caracal on this machine (today: the control plane; see README)
#   make controlplane  build the pinned upstream Kubernetes control plane (and kube-proxy) into target/controlplane/bin
#   make runtime       build the pinned kubelet, containerd (with its runc shim and ctr) and runc into target/runtime/bin
#   make cni-plugins   build the pinned reference CNI plugins (bridge, host-local, loopback) into target/cni-plugins/bin
#   make bench         performance figures into target/bench/*.json
#   make olm           build OLM (olm and catalog operators), opm and the bundle validator into target/olm/bin
#   make helm          build helm into target/helm/bin
#   make release       one version's artefacts in target/dist/<version>: images, OLM bundle and its catalog entry, Helm chart
#   make previous      the previous release (N-1), built from its commit into target/previous/<version>: the upgrade tests' start
#   make manifests     regenerate manifests/ (CRDs, operator manifest, OLM bundle, Helm chart) from the Rust source
#   make lint          cargo fmt --check and clippy -D warnings

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

ROOT        := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
CP_DIR      := $(ROOT)/e2e/controlplane
CP_BIN      := $(ROOT)/target/controlplane/bin
K8S_VERSION := $(shell awk '$$1 == "require" && $$2 == "k8s.io/kubernetes" {print $$3}' $(CP_DIR)/go.mod)
K8S_MINOR   := $(word 2,$(subst ., ,$(K8S_VERSION)))
CP_PROGRAMS := etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kube-proxy
CP_TARGETS  := $(addprefix $(CP_BIN)/,$(CP_PROGRAMS))
# The reference plugins the CNI bench runs beside Caracal's (containernetworking/plugins, from source).
CNIP_DIR     := $(ROOT)/e2e/cniplugins
CNIP_BIN     := $(ROOT)/target/cni-plugins/bin
CNIP_MODULE  := github.com/containernetworking/plugins
CNIP_TARGETS := $(CNIP_BIN)/bridge $(CNIP_BIN)/host-local $(CNIP_BIN)/loopback

# Debian packages the kernel tier needs (iptables and ipset for the policy data plane, ping and iperf3 to
# probe it, conntrack to inspect flows, nft for the CNI bench to watch rules land).
APT_PACKAGES := iproute2 iptables ipset iputils-ping iperf3 conntrack bird2 nftables clang llvm libbpf-dev linux-libc-dev bpftool \
                mmdebstrap umoci skopeo libseccomp-dev

# Never let `go` download a toolchain; build with the one installed.
export GOTOOLCHAIN := local
export GOFLAGS     := -mod=readonly -trimpath
CARGO ?= cargo

VERSION_LDFLAGS := -s -w \
  -X k8s.io/component-base/version.gitVersion=$(K8S_VERSION) \
  -X k8s.io/component-base/version.gitMajor=1 \
  -X k8s.io/component-base/version.gitMinor=$(K8S_MINOR) \
  -X k8s.io/component-base/version.gitTreeState=clean \
  -X k8s.io/client-go/pkg/version.gitVersion=$(K8S_VERSION) \
  -X k8s.io/client-go/pkg/version.gitMajor=1 \
  -X k8s.io/client-go/pkg/version.gitMinor=$(K8S_MINOR)

.PHONY: test lab bench deps controlplane runtime cni-plugins manifests lint unit cluster build clean-controlplane images olm helm release previous

deps:
	@command -v go >/dev/null || { echo "Go is required (the image provides it at /usr/local/go)"; exit 1; }
	@command -v $(CARGO) >/dev/null || { echo "cargo is required (rustup)"; exit 1; }
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s "$$p" >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

controlplane: $(CP_TARGETS)

# One rule builds all five programs: they share one module graph and one go build cache.
$(CP_TARGETS) &: $(CP_DIR)/go.mod $(CP_DIR)/go.sum | deps
	@mkdir -p $(CP_BIN)
	@echo "building the control plane ($(K8S_VERSION)): etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kube-proxy"
	cd $(CP_DIR) && go build -ldflags '$(VERSION_LDFLAGS)' -o $(CP_BIN)/etcd go.etcd.io/etcd/server/v3
	cd $(CP_DIR) && go build -ldflags '$(VERSION_LDFLAGS)' -o $(CP_BIN)/ \
	  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
	  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl k8s.io/kubernetes/cmd/kube-proxy
	@touch $(CP_TARGETS)

# A real node's parts (the real-node lab and test tier): the kubelet from the pinned Kubernetes release (the
# control plane's module), containerd, its runc shim, ctr and runc from e2e/runtime (their own module: containerd's
# Kubernetes libraries are newer than the pinned release's). runc needs cgo (its nsenter is C) and is built
# with seccomp (libseccomp-dev): containerd gives every pod sandbox the runtime's default seccomp profile.
RT_DIR      := $(ROOT)/e2e/runtime
RT_BIN      := $(ROOT)/target/runtime/bin
RT_TARGETS  := $(RT_BIN)/containerd $(RT_BIN)/containerd-shim-runc-v2 $(RT_BIN)/ctr $(RT_BIN)/runc
runtime: $(RT_TARGETS) $(RT_BIN)/kubelet

$(RT_BIN)/kubelet: $(CP_DIR)/go.mod $(CP_DIR)/go.sum | deps
	@mkdir -p $(RT_BIN)
	@echo "building the kubelet ($(K8S_VERSION))"
	cd $(CP_DIR) && go build -ldflags '$(VERSION_LDFLAGS)' -o $(RT_BIN)/kubelet k8s.io/kubernetes/cmd/kubelet

$(RT_TARGETS) &: $(RT_DIR)/go.mod $(RT_DIR)/go.sum | deps
	@mkdir -p $(RT_BIN)
	@echo "building containerd $$(awk '$$1 == "github.com/containerd/containerd/v2" {print $$2; exit}' $(RT_DIR)/go.mod) and runc $$(awk '$$1 == "github.com/opencontainers/runc" {print $$2; exit}' $(RT_DIR)/go.mod)"
	cd $(RT_DIR) && CGO_ENABLED=0 go build -ldflags '-s -w' -o $(RT_BIN)/ \
	  github.com/containerd/containerd/v2/cmd/containerd github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 \
	  github.com/containerd/containerd/v2/cmd/ctr
	cd $(RT_DIR) && CGO_ENABLED=1 go build -tags seccomp -ldflags '-s -w' -o $(RT_BIN)/runc github.com/opencontainers/runc
	@touch $(RT_TARGETS)

cni-plugins: $(CNIP_TARGETS)

$(CNIP_TARGETS) &: $(CNIP_DIR)/go.mod $(CNIP_DIR)/go.sum | deps
	@mkdir -p $(CNIP_BIN)
	@echo "building the reference CNI plugins ($$(awk '$$1 == "require" && $$2 == "$(CNIP_MODULE)" {print $$3}' $(CNIP_DIR)/go.mod)): bridge, host-local, loopback"
	cd $(CNIP_DIR) && go build -ldflags '-s -w' -o $(CNIP_BIN)/ \
	  $(CNIP_MODULE)/plugins/main/bridge $(CNIP_MODULE)/plugins/ipam/host-local $(CNIP_MODULE)/plugins/main/loopback
	@touch $(CNIP_TARGETS)

# The Operator Framework's parts, from the Go module proxy (e2e/olm pins them): OLM's olm and catalog
# operators, opm (serves a catalog), and bundle-validate (the validation library's default and optional suites).
OLM_DIR     := $(ROOT)/e2e/olm
OLM_BIN     := $(ROOT)/target/olm/bin
# Pure-Go signature verification and no storage drivers: no gpgme, btrfs or devicemapper libraries needed.
OLM_TAGS    := containers_image_openpgp,exclude_graphdriver_btrfs,exclude_graphdriver_devicemapper
OLM_TARGETS := $(OLM_BIN)/olm $(OLM_BIN)/catalog $(OLM_BIN)/opm $(OLM_BIN)/bundle-validate
olm: $(OLM_TARGETS)

$(OLM_TARGETS) &: $(OLM_DIR)/go.mod $(OLM_DIR)/go.sum $(OLM_DIR)/validate/main.go | deps
	@mkdir -p $(OLM_BIN)
	@echo "building OLM $$(awk '$$1 == "github.com/operator-framework/operator-lifecycle-manager" {print $$2; exit}' $(OLM_DIR)/go.mod) and opm $$(awk '$$1 == "github.com/operator-framework/operator-registry" {print $$2; exit}' $(OLM_DIR)/go.mod)"
	cd $(OLM_DIR) && go build -tags $(OLM_TAGS) -ldflags '-s -w' -o $(OLM_BIN)/olm github.com/operator-framework/operator-lifecycle-manager/cmd/olm
	cd $(OLM_DIR) && go build -tags $(OLM_TAGS) -ldflags '-s -w' -o $(OLM_BIN)/catalog github.com/operator-framework/operator-lifecycle-manager/cmd/catalog
	cd $(OLM_DIR) && go build -tags $(OLM_TAGS) -ldflags '-s -w' -o $(OLM_BIN)/opm github.com/operator-framework/operator-registry/cmd/opm
	cd $(OLM_DIR) && go build -tags $(OLM_TAGS) -ldflags '-s -w' -o $(OLM_BIN)/bundle-validate ./validate
	@mkdir -p $(ROOT)/target/olm/crds
	cp "$$(cd $(OLM_DIR) && go list -m -f '{{.Dir}}' github.com/operator-framework/api)"/crds/operators.coreos.com_*.yaml $(ROOT)/target/olm/crds/
	@touch $(OLM_TARGETS)

HELM_DIR := $(ROOT)/e2e/helm
HELM_BIN := $(ROOT)/target/helm/bin
HELM_VERSION := $(shell awk '$$1 == "require" && $$2 == "helm.sh/helm/v4" {print $$3}' $(HELM_DIR)/go.mod)
helm: $(HELM_BIN)/helm

$(HELM_BIN)/helm: $(HELM_DIR)/go.mod $(HELM_DIR)/go.sum | deps
	@mkdir -p $(HELM_BIN)
	@echo "building helm $(HELM_VERSION)"
	cd $(HELM_DIR) && go build -ldflags '-s -w -X helm.sh/helm/v4/internal/version.version=$(HELM_VERSION)' -o $(HELM_BIN)/helm helm.sh/helm/v4/cmd/helm
	@touch $@

clean-controlplane:
	rm -rf $(CP_BIN)

manifests:
	$(CARGO) run -q -p caracal-operator --bin caracal-manifests

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

build: deps
	$(CARGO) build --workspace --all-targets --locked

# Unit tier: pure code, no root, no control plane.
unit: deps
	$(CARGO) test --workspace --lib --bins --locked

# Every tier: unit, kernel, cluster and lab. Tests start other packages' binaries (caracal-cni, caracal-typha,
# caracalctl) from target/debug, so every binary is built first.
test: deps controlplane runtime olm helm lint previous images
	$(CARGO) build --workspace --bins --locked
	$(CARGO) test --workspace --locked

# OCI images of the release binaries, without a container engine (target/images; e2e/src/bin/caracal-images.rs):
# layouts, archives for `ctr images import`, and images.json. The Debian root filesystems are cached in
# target/images/rootfs (delete it to take the mirror's current packages).
images: deps
	$(CARGO) build --locked --release -p caracal-operator -p caracal-node -p caracal-typha -p caracal-cni -p caracal-testpod --bins
	$(CARGO) run --locked -q -p caracal-e2e --bin caracal-images -- --out $(ROOT)/target/images --bin-dir $(ROOT)/target/release

# One release (the workspace's version, which every binary, image, bundle and chart carries) in
# target/dist/<version>: the image archives with images.json and the ImageSet, the OLM bundle (as committed in
# manifests/olm, validated again) with its file-based catalog entry (`opm render`), and the packaged chart.
VERSION  := $(shell awk -F'"' '$$1 ~ /^version *= */ {print $$2; exit}' $(ROOT)/Cargo.toml)
DIST     := $(ROOT)/target/dist/$(VERSION)
release: images olm helm
	rm -rf $(DIST) && mkdir -p $(DIST)
	cp $(ROOT)/target/images/*.oci.tar $(ROOT)/target/images/images.json $(ROOT)/target/images/imageset.yaml $(DIST)/
	cp -r $(ROOT)/manifests/olm/$(VERSION) $(DIST)/bundle
	$(OLM_BIN)/bundle-validate $(DIST)/bundle | tail -1
	$(OLM_BIN)/opm render $(DIST)/bundle -o yaml > $(DIST)/catalog-bundle.yaml
	$(HELM_BIN)/helm lint $(ROOT)/manifests/helm/caracal
	$(HELM_BIN)/helm package $(ROOT)/manifests/helm/caracal -d $(DIST)
	@echo "==> Caracal $(VERSION) in $(DIST)"; ls -la $(DIST)

# The previous release (N-1), where every upgrade test starts: the version operator/src/install.rs names
# (PREVIOUS_RELEASE) and the commit its tag (v<version>) points at, named here by hash because a clone need not
# carry tags while it always carries main's history. Its source (`git archive`) is built with this workspace's
# target directory, so the dependencies it shares with this release are compiled once; its release binaries
# are copied out and packed by this release's image builder (same Debian root filesystems) as v<version>; its
# OLM bundle and Helm chart are taken as that release committed them. Built once (delete the directory to
# build it again); `previous` runs before `images`, whose cargo build puts this release's binaries back in
# target/release.
PREVIOUS_VERSION := $(shell awk -F'"' '/^pub const PREVIOUS_RELEASE/ {print $$2}' $(ROOT)/operator/src/install.rs)
PREVIOUS_COMMIT  := d0b0e3da6478ea8b4c59aaf00433d164516c117f
PREV             := $(ROOT)/target/previous/$(PREVIOUS_VERSION)
previous: $(PREV)/images/images.json

$(PREV)/images/images.json: | deps
	@git -C $(ROOT) cat-file -e '$(PREVIOUS_COMMIT)^{commit}' 2>/dev/null || { \
	  echo "v$(PREVIOUS_VERSION)'s commit $(PREVIOUS_COMMIT) is not in this clone (a shallow clone lacks it): fetch main's full history"; exit 1; }
	@echo "building the previous release v$(PREVIOUS_VERSION) ($(PREVIOUS_COMMIT)) into $(PREV)"
	rm -rf $(PREV) && mkdir -p $(PREV)/src $(PREV)/bin
	git -C $(ROOT) archive $(PREVIOUS_COMMIT) | tar -x -C $(PREV)/src
	cd $(PREV)/src && CARGO_TARGET_DIR=$(ROOT)/target $(CARGO) build --locked --release \
	  -p caracal-operator -p caracal-node -p caracal-typha -p caracal-cni --bins
	cp $(ROOT)/target/release/caracal-operator $(ROOT)/target/release/caracal-node $(ROOT)/target/release/caracal-typha \
	  $(ROOT)/target/release/caracal-cni $(PREV)/bin/
	$(CARGO) run --locked -q -p caracal-e2e --bin caracal-images -- --out $(PREV)/images --bin-dir $(PREV)/bin \
	  --tag v$(PREVIOUS_VERSION) --rootfs-cache $(ROOT)/target/images/rootfs --only operator --only node --only cni --only typha
	cp -r $(PREV)/src/manifests/olm/$(PREVIOUS_VERSION) $(PREV)/bundle
	cp -r $(PREV)/src/manifests/helm/caracal $(PREV)/chart

# Performance figures, written to target/bench/*.json (timings are reported, never asserted).
bench: deps controlplane cni-plugins
	$(CARGO) bench --locked -p caracal-operator --bench operator
	$(CARGO) build --locked --release -p caracal-node --bin caracal-node
	$(CARGO) bench --locked -p caracal-node --bench policy
	$(CARGO) bench --locked -p caracal-node --bench wireguard
	$(CARGO) build --locked --release -p caracal-typha --bin caracal-typha
	$(CARGO) bench --locked -p caracal-typha --bench typha
	$(CARGO) build --locked --release -p caracal-node --bin caracal-node -p caracal-cni --bin caracal-cni
	$(CARGO) bench --locked -p caracal-node --bench cni
	$(CARGO) build --locked --workspace --bins
	$(CARGO) bench --locked -p caracal-node --bench lab
	$(CARGO) build --locked --release --workspace --bins
	CARACAL_LAB_BIN_DIR=$(ROOT)/target/release $(CARGO) bench --locked -p caracal-node --bench services
	$(MAKE) runtime images
	$(CARGO) bench --locked -p caracal-node --bench podstartup

lab: deps controlplane
	$(CARGO) build --locked --workspace --bins
	$(CARGO) run -q -p caracal-e2e --bin caracal-lab -- up $(LAB_ARGS)
