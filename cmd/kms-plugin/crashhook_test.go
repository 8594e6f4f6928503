//go:build !serveonly

package main

import (
	"errors"
	"testing"

	"go.uber.org/zap"

	"github.com/kms-plugin/kms-plugin/internal/rotation"
)

func TestParseCrashPoint(t *testing.T) {
	for in, want := range map[string]CrashPoint{
		"":             {},
		"preflight":    {Stage: rotation.StagePreflight},
		"retire":       {Stage: rotation.StageRetire},
		"reencrypt:25": {Stage: rotation.StageReencrypt, Objects: 25},
	} {
		got, err := ParseCrashPoint(in)
		if err != nil || got != want {
			t.Errorf("ParseCrashPoint(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, bad := range []string{"nope", "verify:3", "reencrypt:0", "reencrypt:x"} {
		if _, err := ParseCrashPoint(bad); err == nil {
			t.Errorf("ParseCrashPoint(%q) succeeded", bad)
		}
	}
}

func TestCrashHooks(t *testing.T) {
	crashes := 0
	crash := func() { crashes++ }
	for _, tt := range []struct {
		env        string
		stage      rotation.Stage // AfterStage fires here
		rewrites   int64          // AfterRewrites fires at this n
		noneAtAll  bool
		wantCrashs int
	}{
		{env: "", noneAtAll: true},
		{env: "converge", stage: rotation.StageConverge, wantCrashs: 1},
		{env: "reencrypt", stage: rotation.StageReencrypt, wantCrashs: 1},
		{env: "reencrypt:3", rewrites: 3, wantCrashs: 1},
	} {
		crashes = 0
		h, err := crashHooks(tt.env, crash, zap.NewNop())
		if err != nil {
			t.Fatalf("crashHooks(%q): %v", tt.env, err)
		}
		if tt.noneAtAll {
			if h.AfterStage != nil || h.AfterRewrites != nil {
				t.Errorf("crashHooks(%q) set a hook", tt.env)
			}
			continue
		}
		for _, s := range rotation.Stages() {
			err := callStage(h, s)
			if want := s == tt.stage; errors.Is(err, rotation.ErrCrashed) != want {
				t.Errorf("%s: AfterStage(%s) = %v; want a crash: %v", tt.env, s, err, want)
			}
		}
		for n := int64(1); n <= 5; n++ {
			err := callRewrites(h, n)
			if want := n == tt.rewrites; errors.Is(err, rotation.ErrCrashed) != want {
				t.Errorf("%s: AfterRewrites(%d) = %v; want a crash: %v", tt.env, n, err, want)
			}
		}
		if crashes != tt.wantCrashs {
			t.Errorf("%s: crash called %d times; want %d", tt.env, crashes, tt.wantCrashs)
		}
	}
	if _, err := crashHooks("sideways", crash, zap.NewNop()); err == nil {
		t.Error("crashHooks accepted a bad crash point")
	}
}

func callStage(h rotation.Hooks, s rotation.Stage) error {
	if h.AfterStage == nil {
		return nil
	}
	return h.AfterStage(s)
}

func callRewrites(h rotation.Hooks, n int64) error {
	if h.AfterRewrites == nil {
		return nil
	}
	return h.AfterRewrites(n)
}
