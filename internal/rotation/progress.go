package rotation

import (
	"fmt"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
)

// reporter shows the re-encryption's progress of one resource: a log line
// every ProgressInterval, and a bar on Progress when it is set.
type reporter struct {
	x     *run
	res   string
	prog  *ResourceProgress
	start time.Time
	base  int64
	done  chan struct{}
	wg    sync.WaitGroup
}

func (x *run) newReporter(res string, prog *ResourceProgress) *reporter {
	x.mu.Lock()
	base := prog.Rewritten + prog.SkippedCurrent
	x.mu.Unlock()
	r := &reporter{x: x, res: res, prog: prog, start: time.Now(), base: base, done: make(chan struct{})}
	r.wg.Add(1)
	go r.loop()
	return r
}

func (r *reporter) loop() {
	defer r.wg.Done()
	tick := r.x.cfg.ProgressInterval
	if r.x.cfg.Progress != nil {
		tick = 250 * time.Millisecond
	}
	t := time.NewTicker(tick)
	defer t.Stop()
	lastLog := time.Now()
	for {
		select {
		case <-r.done:
			if r.x.cfg.Progress != nil {
				r.bar()
				fmt.Fprintln(r.x.cfg.Progress)
			}
			return
		case <-t.C:
		}
		if r.x.cfg.Progress != nil {
			r.bar()
		}
		if time.Since(lastLog) >= r.x.cfg.ProgressInterval {
			lastLog = time.Now()
			p := r.snapshot()
			r.x.log.Info("re-encryption progress", zap.String("resource", r.res), zap.Int64("listed", p.Listed),
				zap.Int64("estimate", p.Estimate), zap.Int64("rewritten", p.Rewritten), zap.Int64("alreadyCurrent", p.SkippedCurrent),
				zap.Int64("deletedMeanwhile", p.SkippedDeleted), zap.Int64("conflictsRetried", p.ConflictsRetried),
				zap.Int64("failed", p.Failed), zap.String("rate", fmt.Sprintf("%.0f/s", r.rate(p))))
		}
	}
}

func (r *reporter) snapshot() ResourceProgress {
	r.x.mu.Lock()
	defer r.x.mu.Unlock()
	return *r.prog
}

func (r *reporter) rate(p ResourceProgress) float64 {
	el := time.Since(r.start).Seconds()
	if el <= 0 {
		return 0
	}
	return float64(p.Rewritten+p.SkippedCurrent-r.base) / el
}

// bar draws "secrets [=====>     ] 1200/5000 rewritten 1100 310/s".
func (r *reporter) bar() {
	p := r.snapshot()
	doneN := p.Rewritten + p.SkippedCurrent + p.SkippedDeleted + p.Failed
	total := max(p.Estimate, p.Listed)
	const width = 30
	filled := 0
	if total > 0 {
		filled = int(min(doneN, total) * width / total)
	}
	bar := strings.Repeat("=", filled) + strings.Repeat(" ", width-filled)
	if filled > 0 && filled < width {
		bar = strings.Repeat("=", filled-1) + ">" + strings.Repeat(" ", width-filled)
	}
	fmt.Fprintf(r.x.cfg.Progress, "\r%-12s [%s] %d/%d  rewritten %d  skipped %d  failed %d  %.0f/s ",
		r.res, bar, doneN, total, p.Rewritten, p.SkippedCurrent+p.SkippedDeleted, p.Failed, r.rate(p))
}

func (r *reporter) stop() {
	close(r.done)
	r.wg.Wait()
}
