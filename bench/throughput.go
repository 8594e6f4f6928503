package main

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

type throughputConfig struct {
	Clients  int           // concurrent goroutines
	Conns    []int         // connection counts to try, e.g. 1 (shared, as kube-apiserver) and 64
	Duration time.Duration // measured time per (op, conns, target)
	Warmup   time.Duration // unmeasured load first
}

// rate is the outcome of one timed load.
type rate struct {
	Ops, Errors int64
	Elapsed     time.Duration
	Slices      []float64 // ops/s of each slice
}

// spread returns the lowest and highest slice rate.
func (r rate) spread() (lo, hi float64) {
	if len(r.Slices) == 0 {
		return 0, 0
	}
	return slices.Min(r.Slices), slices.Max(r.Slices)
}

// PerSec is the rate of successful calls.
func (r rate) PerSec() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Ops) / r.Elapsed.Seconds()
}

// throughputRow is one op and connection count against both targets.
type throughputRow struct {
	Op            string
	Conns         int
	Floor, Plugin rate
}

// measureThroughput runs cfg.Clients goroutines calling one op as fast as
// they can, over cfg.Conns connections shared round-robin, against each
// target for cfg.Duration in total. The time is cut into slices of about a
// second that alternate between the targets, so that other load on the
// machine hits both alike.
func measureThroughput(ctx context.Context, floorSock, pluginSock string, cfg throughputConfig) ([]throughputRow, error) {
	n := max(1, int(cfg.Duration/time.Second))
	slice := cfg.Duration / time.Duration(n)
	var rows []throughputRow
	for _, op := range []string{opDecrypt, opEncrypt} {
		for _, conns := range cfg.Conns {
			row := throughputRow{Op: op, Conns: conns}
			fl, err := newLoad(ctx, floorSock, false, op, conns, cfg)
			if err != nil {
				return nil, fmt.Errorf("throughput floor %s with %d connections: %w", op, conns, err)
			}
			pl, err := newLoad(ctx, pluginSock, true, op, conns, cfg)
			if err != nil {
				fl.close()
				return nil, fmt.Errorf("throughput plugin %s with %d connections: %w", op, conns, err)
			}
			for i := range n {
				first, second := fl, pl
				if i%2 == 1 {
					first, second = pl, fl
				}
				first.run(ctx, slice)
				second.run(ctx, slice)
			}
			row.Floor, row.Plugin = fl.total, pl.total
			fl.close()
			pl.close()
			rows = append(rows, row)
			if err := ctx.Err(); err != nil {
				return nil, err
			}
		}
	}
	return rows, nil
}

// load is one target's connections and workload for a throughput row.
type load struct {
	cs      []*client
	w       *workload
	op      string
	clients int
	total   rate
}

// newLoad dials conns connections to sock, prepares the workload and runs
// it unmeasured for cfg.Warmup.
func newLoad(ctx context.Context, sock string, roundTrip bool, op string, conns int, cfg throughputConfig) (*load, error) {
	cs, err := dialMany(ctx, sock, conns)
	if err != nil {
		return nil, err
	}
	w, err := prepare(ctx, cs[0], roundTrip)
	if err != nil {
		closeAll(cs)
		return nil, err
	}
	l := &load{cs: cs, w: w, op: op, clients: cfg.Clients}
	if cfg.Warmup > 0 {
		runLoad(ctx, w, cs, op, cfg.Clients, cfg.Warmup)
	}
	return l, nil
}

func (l *load) run(ctx context.Context, d time.Duration) {
	r := runLoad(ctx, l.w, l.cs, l.op, l.clients, d)
	l.total.Ops += r.Ops
	l.total.Errors += r.Errors
	l.total.Elapsed += r.Elapsed
	l.total.Slices = append(l.total.Slices, r.PerSec())
}

func (l *load) close() { closeAll(l.cs) }

// runLoad runs clients goroutines calling op for d; goroutine i uses
// connection i mod len(cs).
func runLoad(ctx context.Context, w *workload, cs []*client, op string, clients int, d time.Duration) rate {
	var (
		stop        atomic.Bool
		ops, errors atomic.Int64
		wg          sync.WaitGroup
	)
	start := time.Now()
	t := time.AfterFunc(d, func() { stop.Store(true) })
	defer t.Stop()
	for i := range clients {
		c := cs[i%len(cs)]
		wg.Go(func() {
			var n, e int64
			for !stop.Load() && ctx.Err() == nil {
				if w.call(ctx, c, op) != nil {
					e++
				} else {
					n++
				}
			}
			ops.Add(n)
			errors.Add(e)
		})
	}
	wg.Wait()
	return rate{Ops: ops.Load(), Errors: errors.Load(), Elapsed: time.Since(start)}
}
