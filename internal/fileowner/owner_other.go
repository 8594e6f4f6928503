//go:build !unix

package fileowner

import "os"

// UID reports no owner: this system has no uids to check.
func UID(os.FileInfo) (int, bool) { return 0, false }
