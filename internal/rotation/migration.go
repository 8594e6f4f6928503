package rotation

import (
	"context"
	"fmt"

	"go.uber.org/zap"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// migrationInput is what chooseMigration decides from.
type migrationInput struct {
	// Configured is Config.Migration.
	Configured Migration
	// Chosen is what this rotation chose in an earlier run, or "".
	Chosen Migration
	// Served reports whether the cluster serves the storagemigration.k8s.io
	// StorageVersionMigration resource.
	Served bool
	// Controller reports whether a controller runs StorageVersionMigrations
	// (kube-controller-manager holds a fresh leader Lease, or the Lease
	// could not be read); NoController says why not when it is false.
	Controller   bool
	NoController string
}

// chooseMigration decides how a rotation rewrites objects, and says why.
// A rotation keeps what it chose first, unless the cluster stopped serving
// StorageVersionMigrations. The dry run and the re-encrypt stage both
// decide through it, so the dry run says what the real run does. The
// error is for --migration storageversionmigration on a cluster that does
// not serve it.
func chooseMigration(in migrationInput) (Migration, string, error) {
	if in.Chosen != "" {
		if in.Chosen == MigrationSVM && !in.Served {
			return MigrationUpdate, fmt.Sprintf("this rotation chose %s, but the cluster no longer serves %s", MigrationSVM, svmGroup), nil
		}
		return in.Chosen, "chosen when this rotation first re-encrypted", nil
	}
	switch in.Configured {
	case MigrationSVM:
		if !in.Served {
			return "", "", fmt.Errorf("--migration storageversionmigration: the cluster does not serve %s; use --migration update", svmGroup)
		}
		return MigrationSVM, "--migration storageversionmigration", nil
	case MigrationAuto:
		switch {
		case !in.Served:
			return MigrationUpdate, fmt.Sprintf("--migration auto: the cluster does not serve %s", svmGroup), nil
		case !in.Controller:
			return MigrationUpdate, in.NoController, nil
		}
		return MigrationSVM, fmt.Sprintf("--migration auto: the cluster serves %s and kube-controller-manager runs the migrator", svmGroup), nil
	}
	return MigrationUpdate, "--migration update", nil
}

// migrationFor asks the cluster what chooseMigration needs and calls it;
// chosen is what the rotation chose before, or "". It also returns the
// StorageVersionMigration resource the cluster serves, if any.
func (r *Runner) migrationFor(ctx context.Context, chosen Migration) (Migration, string, schema.GroupVersionResource, error) {
	svmGVR, served, err := r.svmServed(ctx)
	if err != nil {
		return "", "", svmGVR, err
	}
	in := migrationInput{Configured: r.cfg.Migration, Chosen: chosen, Served: served}
	if chosen == "" && in.Configured == MigrationAuto && served {
		// The only choice that reads it: ask kube-controller-manager's
		// Lease no more often than that.
		in.Controller, in.NoController = r.controllerManagerAlive(ctx)
	}
	m, why, err := chooseMigration(in)
	return m, why, svmGVR, err
}

// migration fixes, once per rotation, how objects are rewritten, and
// records it in the rotation.
func (x *run) migration(ctx context.Context) (string, schema.GroupVersionResource, error) {
	m, why, svmGVR, err := x.migrationFor(ctx, Migration(x.rot.Migration))
	if err != nil {
		return "", svmGVR, err
	}
	if string(m) != x.rot.Migration {
		x.log.Info("rewriting objects with "+string(m), zap.String("why", why))
	}
	x.rot.Migration = string(m)
	return x.rot.Migration, svmGVR, nil
}
