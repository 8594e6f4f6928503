#!/usr/bin/env bash
# generate.sh writes the kube-apiserver static pod manifests that the golden
# tests of package install start from, with real kubeadm binaries built from
# the Go module proxy (e2e/tools/kubeadm-VERSION pins each one), offline:
#
#   kubeadm init phase control-plane apiserver --config FILE --dry-run
#
# with KUBEADM_INIT_DRYRUN_DIR set to a temporary directory. For each version
# it writes kubeadm-VERSION/:
#
#   kube-apiserver.yaml                        kubeadm's defaults
#                                              (kubeadm-init.yaml + kubeadm-cluster.yaml)
#   kube-apiserver.clusterconfiguration.yaml   with manifests/kubeadm-clusterconfiguration.yaml
#   kube-apiserver.patches.yaml                with the patches in manifests/kubeadm-patches
#
# kubeadm mounts the host's CA certificate directories that exist, so the
# volume lists depend a little on the machine that ran this script.
#
# Usage: internal/install/testdata/generate.sh [VERSION...]   (default: all)
set -euo pipefail

VERSIONS=(v1.32.13 v1.34.4 v1.35.4 v1.36.3 v1.37.2)

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "${here}/../../.." && pwd)"
cache="${KMS_E2E_CACHE:-${repo}/.cache/bin}"

log() { printf 'generate.sh: %s\n' "$*" >&2; }

versions=("$@")
if [[ ${#versions[@]} -eq 0 ]]; then
	versions=("${VERSIONS[@]}")
fi

tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT

for v in "${versions[@]}"; do
	kubeadm="${cache}/kubeadm-${v}"
	if [[ ! -x "${kubeadm}" ]]; then
		log "building kubeadm ${v} (module e2e/tools/kubeadm-${v}) ..."
		mkdir -p "${cache}"
		(cd "${repo}/e2e/tools/kubeadm-${v}" && go build -trimpath -o "${kubeadm}.tmp" k8s.io/kubernetes/cmd/kubeadm)
		mv -f "${kubeadm}.tmp" "${kubeadm}"
	fi
	out="${here}/kubeadm-${v}"
	mkdir -p "${out}"

	# gen NAME PATCHES_LINE CLUSTER_CONFIG: one kubeadm run into NAME.yaml.
	gen() {
		local name="$1" patches="$2" cluster="$3"
		{
			sed "s|^PATCHES$|${patches}|" "${here}/kubeadm-init.yaml"
			echo "---"
			sed "s|^kubernetesVersion: .*|kubernetesVersion: ${v}|" "${cluster}"
		} >"${tmp}/${name}.config.yaml"
		rm -rf "${tmp}/${name}"
		KUBEADM_INIT_DRYRUN_DIR="${tmp}/${name}" "${kubeadm}" init phase control-plane apiserver \
			--config "${tmp}/${name}.config.yaml" --dry-run >"${tmp}/${name}.log" 2>&1 ||
			{ cat "${tmp}/${name}.log" >&2; exit 1; }
		cp "${tmp}/${name}/kube-apiserver.yaml" "${out}/${name}.yaml"
		log "kubeadm ${v}: wrote ${out#"${repo}/"}/${name}.yaml"
	}
	gen kube-apiserver "" "${here}/kubeadm-cluster.yaml"
	gen kube-apiserver.clusterconfiguration "" "${repo}/manifests/kubeadm-clusterconfiguration.yaml"
	gen kube-apiserver.patches "patches: {directory: ${repo}/manifests/kubeadm-patches}" "${here}/kubeadm-cluster.yaml"
done
