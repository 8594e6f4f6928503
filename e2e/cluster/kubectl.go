package cluster

// KubectlVersion is the kubectl e2e/tools/build.sh builds (the rotation
// benchmark runs it for the documented re-encryption path).
const KubectlVersion = "v1.37.2"

// EnvKubectlBin names the kubectl binary the rotation benchmark runs.
const EnvKubectlBin = "KUBECTL_BIN"

// KubectlBinary returns $KUBECTL_BIN or, when unset, the kubectl that
// e2e/tools/build.sh caches. The binary must exist.
func KubectlBinary() (string, error) {
	return cachedBinary(EnvKubectlBin, "kubectl-"+KubectlVersion)
}
