package rotation

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// liveProgress counts the re-encryption of one resource in this process.
// The lister and the workers add to the counters without a lock; the
// coordinator folds them into the resource's persisted progress before
// each save, and the reporter and the metrics read them as they go.
type liveProgress struct {
	// base is the resource's progress as persisted when this process
	// started on it.
	base ResourceProgress

	// What this process counted.
	listed, rewritten, current, deleted, conflictsRetried, failed atomic.Int64
	// estimate is the object count the apiserver announced, or -1.
	estimate atomic.Int64
}

func newLiveProgress(base ResourceProgress) *liveProgress {
	l := &liveProgress{base: base}
	l.estimate.Store(-1)
	return l
}

// fold sets p's counts to base's plus this process's.
func (l *liveProgress) fold(p *ResourceProgress) {
	p.Listed = l.base.Listed + l.listed.Load()
	p.Rewritten = l.base.Rewritten + l.rewritten.Load()
	p.SkippedCurrent = l.base.SkippedCurrent + l.current.Load()
	p.SkippedDeleted = l.base.SkippedDeleted + l.deleted.Load()
	p.ConflictsRetried = l.base.ConflictsRetried + l.conflictsRetried.Load()
	p.Failed = l.base.Failed + l.failed.Load()
	p.Estimate = l.base.Estimate
	if e := l.estimate.Load(); e >= 0 {
		p.Estimate = e
	}
}

// snapshot is the resource's progress now.
func (l *liveProgress) snapshot() ResourceProgress {
	p := l.base
	l.fold(&p)
	return p
}

// reporter shows the re-encryption's progress of one resource: a log line
// every ProgressInterval, and a bar on Progress when it is set.
type reporter struct {
	x     *run
	res   string
	live  *liveProgress
	start time.Time
	done  chan struct{}
	wg    sync.WaitGroup
}

func (x *run) newReporter(res string, live *liveProgress) *reporter {
	r := &reporter{x: x, res: res, live: live, start: time.Now(), done: make(chan struct{})}
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
			p := r.live.snapshot()
			r.x.log.Info("re-encryption progress", zap.String("resource", r.res), zap.Int64("listed", p.Listed),
				zap.Int64("estimate", p.Estimate), zap.Int64("rewritten", p.Rewritten), zap.Int64("alreadyCurrent", p.SkippedCurrent),
				zap.Int64("deletedMeanwhile", p.SkippedDeleted), zap.Int64("conflictsRetried", p.ConflictsRetried),
				zap.Int64("failed", p.Failed), zap.String("rate", fmt.Sprintf("%.0f/s", r.rate())))
		}
	}
}

// rate is the objects handled per second by this process.
func (r *reporter) rate() float64 {
	el := time.Since(r.start).Seconds()
	if el <= 0 {
		return 0
	}
	return float64(r.live.rewritten.Load()+r.live.current.Load()) / el
}

// bar draws "secrets [=====>     ] 1200/5000 rewritten 1100 310/s".
func (r *reporter) bar() {
	p := r.live.snapshot()
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
		r.res, bar, doneN, total, p.Rewritten, p.SkippedCurrent+p.SkippedDeleted, p.Failed, r.rate())
}

func (r *reporter) stop() {
	close(r.done)
	r.wg.Wait()
}
