#!/usr/bin/env bash
# build-pkcs11.sh builds the PKCS#11 image of kms-plugin with podman,
# without a registry: the cgo build (bin/kms-plugin-pkcs11, glibc) on a
# minimal rootfs made of the Debian packages listed in pkcs11-packages,
# fetched with `apt-get download` (at the installed version when the archive
# still has it) and unpacked with `dpkg-deb -x`, plus the static image's
# passwd, group and CA bundle. `make image-pkcs11` runs it after
# `make build-pkcs11`. The vendor's PKCS#11 module is mounted at run time.
#
# Usage: bash hack/image/build-pkcs11.sh PKCS11_BIN TAG...
# Environment: VERSION, REVISION, SOURCE (OCI labels), SOURCE_DATE_EPOCH,
# CONTAINERS_CONF (default hack/image/containers.conf), DEB_CACHE (where
# the .debs are kept; default .cache/image-debs).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "${here}/lib.sh"
repo=$(cd "${here}/../.." && pwd)
if [[ $# -lt 2 ]]; then
	echo "usage: $0 PKCS11_BIN TAG..." >&2
	exit 2
fi
bin=$1
shift

bash "${here}/../apt-install.sh" podman buildah runc ca-certificates
export CONTAINERS_CONF=${CONTAINERS_CONF:-${here}/containers.conf}
if [[ ! -x ${bin} ]]; then
	echo "build-pkcs11.sh: ${bin} is not an executable; run make build-pkcs11" >&2
	exit 1
fi

mapfile -t pkgs < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "${here}/pkcs11-packages")
cache=${DEB_CACHE:-${repo}/.cache/image-debs}
mkdir -p "${cache}"
debs=()
for pkg in "${pkgs[@]}"; do
	ver=$(dpkg-query -W -f='${Version}' "${pkg}" 2>/dev/null || true)
	arch=$(dpkg --print-architecture)
	deb=$(ls "${cache}/${pkg}_${ver//:/%3a}_"*.deb 2>/dev/null | head -1 || true)
	if [[ -z ${ver} || -z ${deb} ]]; then
		# apt-get download writes into the working directory.
		# The installed version when the archive has it, else the candidate;
		# with no package lists yet (a fresh machine), update them once.
		if ! (cd "${cache}" && apt-get download "${pkg}${ver:+=${ver}}" >/dev/null 2>&1) &&
			! (cd "${cache}" && apt-get download "${pkg}" >/dev/null 2>&1); then
			if [[ $(id -u) -eq 0 && -z ${updated:-} ]]; then
				apt-get update >/dev/null
				updated=1
			fi
			(cd "${cache}" && apt-get download "${pkg}" >/dev/null) || {
				echo "build-pkcs11.sh: apt-get download ${pkg} failed" >&2
				exit 1
			}
		fi
		deb=$(ls -t "${cache}/${pkg}_"*"_${arch}.deb" "${cache}/${pkg}_"*"_all.deb" 2>/dev/null | head -1 || true)
	fi
	if [[ -z ${deb} ]]; then
		echo "build-pkcs11.sh: no .deb of ${pkg} in ${cache} after apt-get download" >&2
		exit 1
	fi
	debs+=("${deb}")
done

ctx=$(mktemp -d /tmp/kms-plugin-image-pkcs11.XXXXXX)
trap 'rm -rf "${ctx}"' EXIT
mkdir "${ctx}/rootfs"
for deb in "${debs[@]}"; do
	dpkg-deb -x "${deb}" "${ctx}/rootfs"
done
# Not needed to load the plugin or a module: iconv modules, manuals,
# translations, lintian overrides. The packages' copyright files stay.
rm -rf "${ctx}/rootfs/usr/lib/"*/gconv \
	"${ctx}/rootfs/usr/share/locale" "${ctx}/rootfs/usr/share/man" \
	"${ctx}/rootfs/usr/share/lintian" "${ctx}/rootfs/usr/share/gcc" "${ctx}/rootfs/usr/share/gdb"
find "${ctx}/rootfs/usr/share/doc" -type f ! -name copyright -delete 2>/dev/null || true
# A shell or package tool a package might carry has no place in the image.
rm -rf "${ctx}/rootfs/bin" "${ctx}/rootfs/sbin" "${ctx}/rootfs/usr/bin" "${ctx}/rootfs/usr/sbin"

install -m 0755 "${bin}" "${ctx}/kms-plugin"
install -m 0644 "${here}/passwd" "${here}/group" "${ctx}/"
bash "${here}/ca-bundle.sh" >"${ctx}/ca-certificates.crt"
chmod 0644 "${ctx}/ca-certificates.crt"
cp "${here}/Containerfile.pkcs11" "${ctx}/Containerfile"
printf '%s\n' "${debs[@]##*/}" >"${ctx}/rootfs/usr/share/doc/kms-plugin-rootfs.txt"

podman_build "${ctx}" "$@"
# The binary must start on this rootfs: its loader and libraries are there.
if ! out=$(podman run --rm --pull never --network none "$1" version 2>&1); then
	echo "build-pkcs11.sh: the plugin does not start in $1: ${out}" >&2
	exit 1
fi
podman image inspect --format '{{.Id}} {{.Size}}' "$1" | {
	read -r id size
	echo "build-pkcs11.sh: built $* (${id:0:12}, $((size / 1024)) KiB): ${out}"
}
remove_replaced_images
