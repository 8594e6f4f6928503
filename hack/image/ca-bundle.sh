#!/usr/bin/env bash
# ca-bundle.sh prints the CA bundle of the installed Debian ca-certificates
# package: every certificate the package ships, in name order, concatenated.
# That is what update-ca-certificates writes to
# /etc/ssl/certs/ca-certificates.crt on a default Debian, without the
# certificates an administrator added under /usr/local/share. The image
# (hack/image/build.sh) and the Dockerfile both take their bundle from here.
#
# Usage: bash hack/image/ca-bundle.sh > ca-certificates.crt
set -euo pipefail

mapfile -t crts < <(dpkg-query -L ca-certificates | grep '^/usr/share/ca-certificates/.*\.crt$' | LC_ALL=C sort)
if [[ ${#crts[@]} -eq 0 ]]; then
	echo "ca-bundle.sh: the ca-certificates package ships no certificates here; is it installed?" >&2
	exit 1
fi
for crt in "${crts[@]}"; do
	cat "${crt}"
	# Each certificate on its own lines, even if a file lacks the final newline.
	[[ $(tail -c1 "${crt}" | od -An -c | tr -d ' ') == '\n' ]] || echo
done
