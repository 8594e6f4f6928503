# lib.sh holds what build.sh and build-pkcs11.sh share. They source it
# after setting ${here} (this directory), with set -euo pipefail.

# podman_build CONTEXT TAG... builds CONTEXT/Containerfile in the context
# CONTEXT as the images TAG... with podman: created at SOURCE_DATE_EPOCH
# (default: the last commit's time, so the same context gives the same
# image ID), the OCI labels from VERSION, REVISION and SOURCE. It keeps in
# replaced_ids the images those tags named before (remove_replaced_images).
podman_build() {
	local context=$1 epoch t
	shift
	epoch=${SOURCE_DATE_EPOCH:-$(git -C "${here}" log -1 --format=%ct 2>/dev/null || echo 0)}
	local tags=()
	replaced_ids=()
	for t in "$@"; do
		tags+=(--tag "${t}")
		replaced_ids+=("$(podman image inspect --format '{{.Id}}' "${t}" 2>/dev/null || true)")
	done
	podman build --quiet --layers=false --timestamp "${epoch}" \
		--build-arg VERSION="${VERSION:-dev}" \
		--build-arg REVISION="${REVISION:-unknown}" \
		--build-arg SOURCE="${SOURCE:-https://github.com/kms-plugin/kms-plugin}" \
		"${tags[@]}" --file "${context}/Containerfile" "${context}" >/dev/null
}

# remove_replaced_images removes the images the tags named before
# podman_build once no tag names them any more: they are only disk space
# (never an image another tag still names).
remove_replaced_images() {
	local id
	for id in "${replaced_ids[@]}"; do
		if [[ -n ${id} && $(podman image inspect --format '{{len .RepoTags}}' "${id}" 2>/dev/null) == 0 ]]; then
			podman rmi "${id}" >/dev/null 2>&1 || true
		fi
	done
}
