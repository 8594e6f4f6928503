//go:build unix

package fileowner

import (
	"os"
	"syscall"
)

// UID returns the uid owning fi, and false when fi carries no owner.
func UID(fi os.FileInfo) (int, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, false
	}
	return int(st.Uid), true
}
