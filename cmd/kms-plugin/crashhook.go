//go:build !serveonly

package main

import (
	"fmt"
	"strconv"
	"strings"

	"go.uber.org/zap"

	"github.com/kms-plugin/kms-plugin/internal/rotation"
)

// CrashEnv is the test hook of `kms-plugin rotate`: STAGE, or reencrypt:N.
const CrashEnv = "KMS_PLUGIN_ROTATE_CRASH_AFTER"

// crashExitCode is the exit code of the crash hook, as for SIGKILL.
const crashExitCode = 137

// CrashPoint names where the crash hook fires: right after Stage was
// persisted as completed, or, with Objects > 0, once that many objects were
// rewritten in the re-encrypt stage.
type CrashPoint struct {
	Stage   rotation.Stage
	Objects int64
}

// IsZero reports whether no crash point is set.
func (c CrashPoint) IsZero() bool { return c.Stage == "" }

// ParseCrashPoint parses "STAGE" or "reencrypt:N"; "" is no crash point.
func ParseCrashPoint(s string) (CrashPoint, error) {
	if s == "" {
		return CrashPoint{}, nil
	}
	name, n, hasN := strings.Cut(s, ":")
	st := rotation.Stage(name)
	valid := false
	for _, x := range rotation.Stages() {
		valid = valid || x == st
	}
	if !valid {
		return CrashPoint{}, fmt.Errorf("crash point %q: stage must be one of preflight, rotate, converge, reencrypt, verify, retire", s)
	}
	cp := CrashPoint{Stage: st}
	if hasN {
		if st != rotation.StageReencrypt {
			return CrashPoint{}, fmt.Errorf("crash point %q: an object count only applies to reencrypt", s)
		}
		v, err := strconv.ParseInt(n, 10, 64)
		if err != nil || v <= 0 {
			return CrashPoint{}, fmt.Errorf("crash point %q: %q is not a positive object count", s, n)
		}
		cp.Objects = v
	}
	return cp, nil
}

// crashHooks parses env (the value of CrashEnv) and returns the rotation
// hooks that call crash at that point: the command exits with
// crashExitCode there. When crash returns (in tests), the hook returns
// rotation.ErrCrashed, which stops the run as the exit would have.
func crashHooks(env string, crash func(), log *zap.Logger) (rotation.Hooks, error) {
	cp, err := ParseCrashPoint(env)
	if err != nil {
		return rotation.Hooks{}, fmt.Errorf("%s: %w", CrashEnv, err)
	}
	if cp.IsZero() {
		return rotation.Hooks{}, nil
	}
	fire := func() error {
		log.Warn("crash hook: exiting", zap.String("crashAfter", string(cp.Stage)), zap.Int64("objects", cp.Objects))
		crash()
		return rotation.ErrCrashed
	}
	if cp.Objects > 0 {
		return rotation.Hooks{AfterRewrites: func(n int64) error {
			if n != cp.Objects {
				return nil
			}
			return fire()
		}}, nil
	}
	return rotation.Hooks{AfterStage: func(s rotation.Stage) error {
		if s != cp.Stage {
			return nil
		}
		return fire()
	}}, nil
}
