#!/usr/bin/env bash
# apt-install.sh installs the Debian packages a test or build target needs,
# when any of them is missing: make test runs it as root on CI. It never
# upgrades what is installed. Without root it prints the command to run and
# fails, so a missing package is one clear line, not a confusing test error.
#
# Usage: bash hack/apt-install.sh PACKAGE...
set -euo pipefail

missing=()
for pkg in "$@"; do
	if ! dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q 'install ok installed'; then
		missing+=("${pkg}")
	fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
	exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
	echo "hack/apt-install.sh: missing Debian packages: ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
	exit 1
fi
echo "hack/apt-install.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# A fresh machine may have no package lists yet; update once, then install.
if ! apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/apt-install.$$.log 2>&1; then
	apt-get update >/dev/null
	apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/apt-install.$$.log 2>&1 || {
		cat /tmp/apt-install.$$.log >&2
		exit 1
	}
fi
rm -f /tmp/apt-install.$$.log
