#!/usr/bin/env bash
# build.sh builds the kms-plugin image with podman, without a registry:
# it assembles a context directory (the two static binaries, the CA bundle
# of Debian's ca-certificates, passwd and group) and runs `podman build` on
# hack/image/Containerfile, which starts FROM scratch. `make image` runs it
# after `make build`; it installs podman, buildah, runc and ca-certificates
# when they are missing (hack/apt-install.sh).
#
# Usage: bash hack/image/build.sh BIN SERVE_BIN TAG...
#   BIN, SERVE_BIN  bin/kms-plugin and bin/kms-plugin-serve (static)
#   TAG             image names, e.g. kms-plugin:v0.1.0 kms-plugin:dev
# Environment: VERSION, REVISION, SOURCE (the OCI labels), SOURCE_DATE_EPOCH
# (the image's creation time; default: the last commit's time, so the same
# binaries give the same image ID), CONTAINERS_CONF (default:
# hack/image/containers.conf, runc and cgroupfs; see that file).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "${here}/lib.sh"
if [[ $# -lt 3 ]]; then
	echo "usage: $0 BIN SERVE_BIN TAG..." >&2
	exit 2
fi
bin=$1 serve_bin=$2
shift 2

bash "${here}/../apt-install.sh" podman buildah runc ca-certificates
export CONTAINERS_CONF=${CONTAINERS_CONF:-${here}/containers.conf}

for b in "${bin}" "${serve_bin}"; do
	if [[ ! -x ${b} ]]; then
		echo "build.sh: ${b} is not an executable; run make build" >&2
		exit 1
	fi
	# FROM scratch has no libc: only a static binary runs in it.
	if ldd "${b}" >/dev/null 2>&1; then
		echo "build.sh: ${b} is dynamically linked; build it with CGO_ENABLED=0 (make build)" >&2
		exit 1
	fi
done

ctx=$(mktemp -d /tmp/kms-plugin-image.XXXXXX)
trap 'rm -rf "${ctx}"' EXIT
install -m 0755 "${bin}" "${ctx}/kms-plugin"
install -m 0755 "${serve_bin}" "${ctx}/kms-plugin-serve"
install -m 0644 "${here}/passwd" "${here}/group" "${ctx}/"
bash "${here}/ca-bundle.sh" >"${ctx}/ca-certificates.crt"
chmod 0644 "${ctx}/ca-certificates.crt"
cp "${here}/Containerfile" "${ctx}/Containerfile"

podman_build "${ctx}" "$@"
podman image inspect --format '{{.Id}} {{.Size}}' "$1" | {
	read -r id size
	echo "build.sh: built $* (${id:0:12}, $((size / 1024)) KiB)"
}
remove_replaced_images
