#!/usr/bin/env bash
# build.sh builds, when missing, the pinned kube-apiserver, etcd and kubectl
# binaries the e2e tests run, into a cache directory kept between runs:
#
#   ${KMS_E2E_CACHE:-<repo>/.cache/bin}/kube-apiserver-v1.37.2
#   ${KMS_E2E_CACHE:-<repo>/.cache/bin}/etcd-v3.6.16
#   ${KMS_E2E_CACHE:-<repo>/.cache/bin}/kubectl-v1.37.2   (rotation benchmark)
#   ${KMS_E2E_CACHE:-<repo>/.cache/bin}/kube-controller-manager-v1.37.2
#       (its storage version migrator, for rotate's StorageVersionMigration path)
#   ${KMS_E2E_CACHE:-<repo>/.cache/bin}/promtool-v0.316.0 and promql-metrics-v0.316.0
#       (Prometheus's promtool and parser: make lint, the monitoring tests)
#   ${KMS_E2E_CACHE:-<repo>/.cache/bin}/vault-server-<hash of vault-server/go.sum, sdk.patch, main.go>
#       (a real Vault v1.21.4 core for the vault provider's tests; the symlink
#       vault-server points at the newest build)
#
# Each binary is built under a temporary name and renamed into place, so an
# interrupted build never leaves a half-written binary behind.
#
# Usage: bash e2e/tools/build.sh [kube-apiserver|kube-controller-manager|etcd|kubectl|promtool|vault-server]...   (default: all)
set -euo pipefail

KUBE_APISERVER_VERSION=v1.37.2
ETCD_VERSION=v3.6.16
KUBECTL_VERSION=v1.37.2
# Go module version of github.com/prometheus/prometheus (Prometheus 3.x is
# tagged v0.3xx.y for Go); tools/promtool/go.mod pins the same.
PROMETHEUS_VERSION=v0.316.0

tools_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${tools_dir}/../.." && pwd)"
cache="${KMS_E2E_CACHE:-${repo_root}/.cache/bin}"

log() { printf 'e2e/tools/build.sh: %s\n' "$*" >&2; }

# build NAME MODULE_DIR PACKAGE: go build PACKAGE inside MODULE_DIR into
# $cache/NAME unless that file already exists.
build() {
	local name="$1" module_dir="$2" pkg="$3"
	local out="${cache}/${name}"
	if [[ -x "${out}" ]]; then
		log "${name}: cached at ${out}"
		return 0
	fi
	mkdir -p "${cache}"
	# A temporary directory next to the target (same file system, so the
	# final mv is an atomic rename); go build refuses to overwrite an
	# existing non-executable file, so do not pre-create the output file.
	local tmpdir
	tmpdir="$(mktemp -d "${cache}/.${name}.XXXXXX")"
	# Remove the temporary directory if the build fails or is interrupted.
	trap 'rm -rf "'"${tmpdir}"'"' EXIT
	log "${name}: building ${pkg} (module ${module_dir#"${repo_root}/"}) ..."
	local start=${SECONDS}
	(cd "${module_dir}" && go build -trimpath -o "${tmpdir}/${name}" "${pkg}")
	mv -f "${tmpdir}/${name}" "${out}"
	rm -rf "${tmpdir}"
	trap - EXIT
	log "${name}: built ${out} in $((SECONDS - start))s"
}

# prepare_vault_sdk copies github.com/hashicorp/vault/sdk v0.21.0 from the module
# cache into ${repo_root}/.cache/vault-sdk-v0.21.0-patched (the vault-server
# module's replace target, git-ignored) and applies vault-server/sdk.patch, unless a
# copy made from the same patch is already there. Vault v1.21.4 builds only
# against its own unpublished in-repo sdk; the patch adjusts the two signatures
# that differ (LockManager.RestorePolicy, framework.Backend.ActivationFunc).
prepare_vault_sdk() {
	local dst="${repo_root}/.cache/vault-sdk-v0.21.0-patched"
	local want
	want="$(sha256sum "${tools_dir}/vault-server/sdk.patch" | cut -c1-64)"
	if [[ -f "${dst}/.patched" && "$(cat "${dst}/.patched")" == "${want}" ]]; then
		return 0
	fi
	local src
	src="$(cd / && GOFLAGS= go mod download -json github.com/hashicorp/vault/sdk@v0.21.0 | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
	[[ -d "${src}" ]] || { log "vault sdk: module download failed"; return 1; }
	mkdir -p "${repo_root}/.cache"
	local tmp
	tmp="$(mktemp -d "${repo_root}/.cache/.vault-sdk.XXXXXX")"
	cp -r "${src}/." "${tmp}/"
	chmod -R u+w "${tmp}"
	patch -s -p1 -d "${tmp}" <"${tools_dir}/vault-server/sdk.patch"
	printf '%s' "${want}" >"${tmp}/.patched"
	rm -rf "${dst}"
	mv "${tmp}" "${dst}"
	log "vault sdk: patched copy at ${dst#"${repo_root}/"}"
}

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
	targets=(kube-apiserver kube-controller-manager etcd kubectl promtool vault-server)
fi

for target in "${targets[@]}"; do
	case "${target}" in
	kube-apiserver)
		build "kube-apiserver-${KUBE_APISERVER_VERSION}" "${tools_dir}/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
		;;
	kube-controller-manager)
		# Same k8s.io/kubernetes version as kube-apiserver, its own go.sum.
		build "kube-controller-manager-${KUBE_APISERVER_VERSION}" "${tools_dir}/kube-controller-manager-${KUBE_APISERVER_VERSION}" k8s.io/kubernetes/cmd/kube-controller-manager
		;;
	etcd)
		build "etcd-${ETCD_VERSION}" "${tools_dir}/etcd" .
		;;
	kubectl)
		build "kubectl-${KUBECTL_VERSION}" "${tools_dir}/kubectl-${KUBECTL_VERSION}" k8s.io/kubernetes/cmd/kubectl
		;;
	promtool)
		build "promtool-${PROMETHEUS_VERSION}" "${tools_dir}/promtool" github.com/prometheus/prometheus/cmd/promtool
		build "promql-metrics-${PROMETHEUS_VERSION}" "${tools_dir}/promtool" ./promql-metrics
		;;
	vault-server)
		# Keyed on the tools module's go.sum, the sdk patch and main.go: a change
		# to any of them builds a new binary.
		prepare_vault_sdk
		vault_hash="$(cat "${tools_dir}/vault-server/go.sum" "${tools_dir}/vault-server/sdk.patch" "${tools_dir}/vault-server/main.go" | sha256sum | cut -c1-12)"
		build "vault-server-${vault_hash}" "${tools_dir}/vault-server" .
		# A stable name for tests (KMS_VAULT_SERVER_BIN), swapped atomically.
		ln -sfn "vault-server-${vault_hash}" "${cache}/.vault-server.link"
		mv -Tf "${cache}/.vault-server.link" "${cache}/vault-server"
		;;
	*)
		log "unknown target ${target:?} (want kube-apiserver, kube-controller-manager, etcd, kubectl, promtool or vault-server)"
		exit 2
		;;
	esac
done
