package clocktest

import (
	"sync"
	"testing"
	"time"
)

func TestClock(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	c := New(start)
	tests := []struct {
		add  time.Duration
		want time.Time
	}{
		{0, start},
		{time.Hour, start.Add(time.Hour)},
		{-30 * time.Minute, start.Add(30 * time.Minute)},
	}
	for _, tt := range tests {
		c.Add(tt.add)
		if got := c.Now(); !got.Equal(tt.want) {
			t.Fatalf("after Add(%v): Now() = %v, want %v", tt.add, got, tt.want)
		}
	}
	// Concurrent use (run with -race).
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.Add(time.Second)
			_ = c.Now()
		}()
	}
	wg.Wait()
	if got, want := c.Now(), start.Add(30*time.Minute+8*time.Second); !got.Equal(want) {
		t.Fatalf("after 8 concurrent Add(1s): %v, want %v", got, want)
	}
}
