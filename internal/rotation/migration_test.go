package rotation

import (
	"errors"
	"strings"
	"testing"
)

func TestChooseMigration(t *testing.T) {
	const noKCM = "no kube-controller-manager leader Lease"
	for _, tt := range []struct {
		name    string
		in      migrationInput
		want    Migration
		wantWhy string
		wantErr string
	}{
		{"update", migrationInput{Configured: MigrationUpdate, Served: true, Controller: true}, MigrationUpdate, "--migration update", ""},
		{"svm served", migrationInput{Configured: MigrationSVM, Served: true}, MigrationSVM, "--migration storageversionmigration", ""},
		{"svm not served", migrationInput{Configured: MigrationSVM}, "", "", "the cluster does not serve storagemigration.k8s.io; use --migration update"},
		{"auto, served, controller", migrationInput{Configured: MigrationAuto, Served: true, Controller: true}, MigrationSVM, "kube-controller-manager runs the migrator", ""},
		{"auto, served, no controller", migrationInput{Configured: MigrationAuto, Served: true, NoController: noKCM}, MigrationUpdate, noKCM, ""},
		{"auto, not served", migrationInput{Configured: MigrationAuto, Controller: true}, MigrationUpdate, "does not serve", ""},
		{"resumed keeps its choice", migrationInput{Configured: MigrationUpdate, Chosen: MigrationSVM, Served: true}, MigrationSVM, "chosen when this rotation", ""},
		{"resumed, no longer served", migrationInput{Configured: MigrationSVM, Chosen: MigrationSVM}, MigrationUpdate, "no longer serves", ""},
		{"resumed update", migrationInput{Configured: MigrationAuto, Chosen: MigrationUpdate, Served: true, Controller: true}, MigrationUpdate, "chosen when this rotation", ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, why, err := chooseMigration(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("chooseMigration(%+v) = %q, %v; want an error containing %q", tt.in, got, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want || !strings.Contains(why, tt.wantWhy) {
				t.Fatalf("chooseMigration(%+v) = %q (%q), %v; want %q (%q)", tt.in, got, why, err, tt.want, tt.wantWhy)
			}
		})
	}
}

// TestDryRunMigrationMatchesRun: the dry run decides the migration as the
// real run does, so it fails where the real run would.
func TestDryRunMigrationMatchesRun(t *testing.T) {
	c := newCluster(t, clusterOpts{secrets: 2}) // serves no storagemigration.k8s.io
	cfg := c.config()
	cfg.Migration = MigrationSVM
	dry := cfg
	dry.DryRun = true
	_, dryErr := runOnce(t, c.runner(dry))
	_, runErr := runOnce(t, c.runner(cfg))
	for name, err := range map[string]error{"dry run": dryErr, "run": runErr} {
		var se *StageError
		if !errors.As(err, &se) || se.Stage != StageReencrypt || !strings.Contains(err.Error(), "--migration storageversionmigration: the cluster does not serve") {
			t.Errorf("%s: %v; want a reencrypt failure: the cluster does not serve StorageVersionMigrations", name, err)
		}
	}
}
