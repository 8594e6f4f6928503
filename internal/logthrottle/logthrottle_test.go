package logthrottle

import (
	"testing"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/clocktest"
)

func TestAdmit(t *testing.T) {
	clock := clocktest.New(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	l := New(time.Second, clock.Now)
	for i, tc := range []struct {
		advance    time.Duration
		cause      string
		want       bool
		suppressed uint64
	}{
		{0, "Decrypt/InvalidArgument", true, 0},
		{0, "Decrypt/InvalidArgument", false, 0},
		{0, "Decrypt/Unavailable", true, 0},
		{0, "Encrypt/InvalidArgument", true, 0},
		{0, "Decrypt/Unavailable", false, 0},
		{500 * time.Millisecond, "Decrypt/InvalidArgument", false, 0},
		{500 * time.Millisecond, "Decrypt/InvalidArgument", true, 2},
		{-time.Hour, "Decrypt/InvalidArgument", true, 0}, // clock stepped back
	} {
		clock.Add(tc.advance)
		ok, n := l.Admit(tc.cause)
		if ok != tc.want || n != tc.suppressed {
			t.Fatalf("step %d: Admit(%s) = %v, %d; want %v, %d", i, tc.cause, ok, n, tc.want, tc.suppressed)
		}
	}
}
