#!/usr/bin/env bash
# build.sh builds, when missing, the pinned kube-apiserver, etcd and kubectl
# binaries the e2e tests run, into a cache directory kept between runs:
#
#   ${KMS_E2E_CACHE:-<repo>/.cache/bin}/kube-apiserver-v1.37.2
#   ${KMS_E2E_CACHE:-<repo>/.cache/bin}/etcd-v3.6.16
#   ${KMS_E2E_CACHE:-<repo>/.cache/bin}/kubectl-v1.37.2   (rotation benchmark)
#   ${KMS_E2E_CACHE:-<repo>/.cache/bin}/kube-controller-manager-v1.37.2
#       (its storage version migrator, for rotate's StorageVersionMigration path)
#
# Each binary is built under a temporary name and renamed into place, so an
# interrupted build never leaves a half-written binary behind.
#
# Usage: bash e2e/tools/build.sh [kube-apiserver|kube-controller-manager|etcd|kubectl]...   (default: all)
set -euo pipefail

KUBE_APISERVER_VERSION=v1.37.2
ETCD_VERSION=v3.6.16
KUBECTL_VERSION=v1.37.2

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

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
	targets=(kube-apiserver kube-controller-manager etcd kubectl)
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
	*)
		log "unknown target ${target:?} (want kube-apiserver, kube-controller-manager, etcd or kubectl)"
		exit 2
		;;
	esac
done
