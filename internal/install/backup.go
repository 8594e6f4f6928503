package install

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// DefaultKeepBackups is how many backup directories Apply keeps when
// Config.KeepBackups is 0.
const DefaultKeepBackups = 5

// Backups hold copies of replaced files: kube-apiserver's manifest, the
// plugin config, the EncryptionConfiguration (which may hold aescbc keys)
// and the admin port's private keys. Their directories are 0700 and their
// files 0600, and only the newest few are kept.
const (
	backupDirPerm  fs.FileMode = 0o700
	backupFilePerm fs.FileMode = 0o600
)

// backupStamp is the layout of a backup directory's name: the UTC time of
// the change, and ".N" for the N-th other change in the same second.
const backupStamp = "20060102T150405Z"

var backupNameRE = regexp.MustCompile(`^[0-9]{8}T[0-9]{6}Z(\.[0-9]{1,9})?$`)

// backup copies every existing file of the plan under a new directory
// named after the current time, and returns that directory ("" when no
// file existed). On failure it removes what it wrote.
func (i *Installer) backup(p *Plan) (dir string, err error) {
	exists := false
	for _, c := range p.Changes {
		exists = exists || c.Existed
	}
	if !exists {
		return "", nil
	}
	fsys := i.cfg.FS
	var created []string // directories and files, in creation order
	defer func() {
		if err != nil {
			for n := len(created) - 1; n >= 0; n-- {
				fsys.Remove(created[n]) //nolint:errcheck // best effort: a leftover backup harms nothing
			}
			err = fmt.Errorf("backup: %w; nothing was changed", err)
		}
	}()
	dirs, err := mkdirAll(fsys, i.cfg.Paths.BackupDir, backupDirPerm)
	created = append(created, dirs...)
	if err != nil {
		return "", err
	}
	stamp := i.cfg.Now().UTC().Format(backupStamp)
	for n := 0; ; n++ {
		dir = filepath.Join(i.cfg.Paths.BackupDir, stamp)
		if n > 0 {
			dir += "." + strconv.Itoa(n)
		}
		err := fsys.Mkdir(dir, backupDirPerm)
		if err == nil {
			created = append(created, dir)
			break
		}
		if !errors.Is(err, fs.ErrExist) || n > 100 {
			return "", fmt.Errorf("create %s: %w", dir, err)
		}
	}
	for _, c := range p.Changes {
		if !c.Existed {
			continue
		}
		dst := filepath.Join(dir, c.Path)
		dirs, err := mkdirAll(fsys, filepath.Dir(dst), backupDirPerm)
		created = append(created, dirs...)
		if err != nil {
			return "", err
		}
		err = writeAtomic(fsys, dst, c.Old, backupFilePerm)
		if _, statErr := fsys.Stat(dst); statErr == nil {
			created = append(created, dst)
		}
		if err != nil {
			return "", err
		}
	}
	return dir, nil
}

// pruneBackups removes the oldest backup directories so that
// Config.KeepBackups remain, counting current (the one just made, never
// removed, even when the clock went back). Only directories named as
// backup makes them are considered; anything else in the backup directory,
// and symbolic links, stay.
func (i *Installer) pruneBackups(current string) ([]string, error) {
	keep := i.cfg.KeepBackups
	if keep < 0 {
		return nil, nil
	}
	fsys := i.cfg.FS
	entries, err := fsys.ReadDir(i.cfg.Paths.BackupDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("prune backups: %w", err)
	}
	var names []string
	for _, e := range entries {
		dir := filepath.Join(i.cfg.Paths.BackupDir, e.Name())
		if e.Type().IsDir() && backupNameRE.MatchString(e.Name()) && dir != current {
			names = append(names, e.Name())
		}
	}
	slices.SortFunc(names, compareBackups)
	if current != "" {
		keep--
	}
	var pruned []string
	for _, name := range names[:max(len(names)-keep, 0)] {
		dir := filepath.Join(i.cfg.Paths.BackupDir, name)
		if err := fsys.RemoveAll(dir); err != nil {
			return pruned, fmt.Errorf("prune backups: remove %s: %w", dir, err)
		}
		pruned = append(pruned, dir)
	}
	return pruned, nil
}

// compareBackups orders backup directory names oldest first: by time,
// then by the ".N" counter as a number.
func compareBackups(a, b string) int {
	as, an, _ := strings.Cut(a, ".")
	bs, bn, _ := strings.Cut(b, ".")
	if c := strings.Compare(as, bs); c != 0 {
		return c
	}
	x, _ := strconv.Atoi(an)
	y, _ := strconv.Atoi(bn)
	return x - y
}
