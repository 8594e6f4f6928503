package install

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"time"
)

// ErrChangedSincePlanned is returned by Apply when a file no longer holds
// what the plan was computed from; nothing has been written.
var ErrChangedSincePlanned = errors.New("file changed since the plan was made")

// Change is one file a Plan writes or removes.
type Change struct {
	// Path is the host-absolute path of the file.
	Path string
	// Existed tells whether the file exists now; Old is its content and
	// OldPerm its permission bits.
	Existed bool
	Old     []byte
	OldPerm fs.FileMode
	// Remove deletes the file; otherwise New is written with Perm.
	Remove bool
	New    []byte
	Perm   fs.FileMode
	// Sensitive marks files that may hold key material (an
	// EncryptionConfiguration with aescbc keys): Diff redacts secrets.
	Sensitive bool
	// Secret marks files that are key material as a whole (a private
	// key): Diff names them and shows none of their content.
	Secret bool
	// Restyled tells that the file's YAML formatting changes beyond the
	// edits themselves (its style could not be reproduced); its content
	// and comments are kept.
	Restyled bool
}

// Plan is what install or uninstall would do on a node: the files to
// change, in the order they are applied, and the steps left to the
// operator. A Plan holds no file that would stay byte-identical.
type Plan struct {
	Changes []Change
	// Notes are the follow-up steps for the operator, one per line.
	Notes []string
}

// Empty tells whether applying the plan would change nothing.
func (p *Plan) Empty() bool { return len(p.Changes) == 0 }

// add appends a change unless the file would stay as it is.
func (p *Plan) add(c Change) {
	if c.Remove && !c.Existed {
		return
	}
	if !c.Remove && c.Existed && bytes.Equal(c.Old, c.New) {
		return
	}
	p.Changes = append(p.Changes, c)
}

// Diff returns a unified diff of every change (secret values in sensitive
// files redacted), or nothing for an empty plan.
func (p *Plan) Diff() []byte {
	var buf bytes.Buffer
	for _, c := range p.Changes {
		oldName, newName := c.Path, c.Path
		if !c.Existed {
			oldName = "/dev/null"
		}
		if c.Remove {
			newName = "/dev/null"
		}
		if c.Secret {
			fmt.Fprintf(&buf, "--- %s\n+++ %s\n# %s: key material, not shown\n", oldName, newName, c.Path)
			continue
		}
		d := unifiedDiff(oldName, newName, c.Old, c.New, 3)
		if c.Sensitive {
			d = redactSecrets(d)
		}
		if c.Restyled {
			fmt.Fprintf(&buf, "# note: %s is re-indented; its content and comments are kept\n", c.Path)
		}
		buf.Write(d)
	}
	return buf.Bytes()
}

// Result tells what Apply did.
type Result struct {
	// BackupDir holds a copy of every file replaced or removed, at its
	// host path under this directory; empty when nothing existed before.
	BackupDir string
	// Written and Removed list the changed files.
	Written []string
	Removed []string
	// Pruned lists the older backup directories removed after the change,
	// beyond Config.KeepBackups. PruneErr is why pruning stopped, if it
	// did; the change itself succeeded.
	Pruned   []string
	PruneErr error
}

// Apply carries out a plan. It first checks that every file still holds
// what the plan was made from, then copies every file it will replace or
// remove into a new backup directory, then changes the files one by one,
// each atomically. If a change fails, the files already changed are
// restored (from memory; the backup directory stays as a second copy) and
// directories it created are removed, so the node is left as it was. After
// a successful change, the oldest backup directories beyond
// Config.KeepBackups are removed.
func (i *Installer) Apply(p *Plan) (*Result, error) {
	res := &Result{}
	if p.Empty() {
		return res, nil
	}
	fsys := i.cfg.FS
	for _, c := range p.Changes {
		data, _, ok, err := readOptional(fsys, c.Path)
		if err != nil {
			return nil, err
		}
		if ok != c.Existed || (ok && !bytes.Equal(data, c.Old)) {
			return nil, fmt.Errorf("%s: %w; run again", c.Path, ErrChangedSincePlanned)
		}
	}
	backupDir, err := i.backup(p)
	if err != nil {
		return nil, err
	}
	res.BackupDir = backupDir

	var createdDirs []string
	for n, c := range p.Changes {
		var err error
		if c.Remove {
			err = fsys.Remove(c.Path)
			if err == nil {
				err = fsys.SyncDir(filepath.Dir(c.Path))
			}
			if err != nil {
				err = fmt.Errorf("remove %s: %w", c.Path, err)
			}
		} else {
			var created []string
			created, err = mkdirAll(fsys, filepath.Dir(c.Path), 0o755)
			createdDirs = append(createdDirs, created...)
			if err == nil {
				err = writeAtomic(fsys, c.Path, c.New, c.Perm)
			}
		}
		if err != nil {
			if rbErr := rollback(fsys, p.Changes[:n+1], createdDirs); rbErr != nil {
				return res, fmt.Errorf("%w; rollback failed, restore by hand from %s: %w", err, backupDir, rbErr)
			}
			return res, fmt.Errorf("%w; every file was restored as it was", err)
		}
		if c.Remove {
			res.Removed = append(res.Removed, c.Path)
		} else {
			res.Written = append(res.Written, c.Path)
		}
	}
	res.Pruned, res.PruneErr = i.pruneBackups(backupDir)
	return res, nil
}

// rollback restores changes in reverse order and removes created
// directories that are empty again.
func rollback(fsys FS, changes []Change, createdDirs []string) error {
	var errs []error
	for n := len(changes) - 1; n >= 0; n-- {
		c := changes[n]
		if c.Existed {
			if err := writeAtomic(fsys, c.Path, c.Old, c.OldPerm); err != nil {
				errs = append(errs, err)
			}
			continue
		}
		if err := fsys.Remove(c.Path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove %s: %w", c.Path, err))
		}
	}
	for n := len(createdDirs) - 1; n >= 0; n-- {
		fsys.Remove(createdDirs[n]) //nolint:errcheck // not empty means something else uses it
	}
	return errors.Join(errs...)
}

// defaultNow is the real clock.
func defaultNow() time.Time { return time.Now() }
