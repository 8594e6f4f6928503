package rotation

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// lease is the coordination.k8s.io Lease that keeps two runs apart.
type lease struct {
	r *Runner
}

// LeaseInfo describes the Lease as `kms-plugin status` shows it.
type LeaseInfo struct {
	Holder    string     `json:"holder,omitempty"`
	RenewTime *time.Time `json:"renewTime,omitempty"`
	Expires   *time.Time `json:"expires,omitempty"`
}

// acquire takes the Lease, or returns a *LeaseHeldError naming its holder.
func (l *lease) acquire(ctx context.Context) error {
	var err error
	for range 5 {
		if err = l.tryAcquire(ctx); !errors.Is(err, errLeaseRace) {
			return err
		}
	}
	return fmt.Errorf("take Lease %s/%s: it keeps changing under us", l.r.cfg.Namespace, l.r.cfg.Name)
}

// errLeaseRace is a Lease changed between reading and writing it.
var errLeaseRace = errors.New("lease changed meanwhile")

func (l *lease) tryAcquire(ctx context.Context) error {
	cfg := l.r.cfg
	leases := cfg.Client.CoordinationV1().Leases(cfg.Namespace)
	now := metav1.NewMicroTime(cfg.Now())
	secs := int32(cfg.LeaseDuration / time.Second)
	if secs < 1 {
		secs = 1
	}
	cur, err := leases.Get(ctx, cfg.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = leases.Create(ctx, &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: cfg.Name, Namespace: cfg.Namespace,
				Labels: map[string]string{"app.kubernetes.io/name": "kms-plugin", "app.kubernetes.io/component": "rotation"}},
			Spec: coordinationv1.LeaseSpec{
				HolderIdentity: &cfg.Identity, LeaseDurationSeconds: &secs,
				AcquireTime: &now, RenewTime: &now,
			},
		}, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			return errLeaseRace
		}
		if err != nil {
			return fmt.Errorf("create Lease %s/%s: %w", cfg.Namespace, cfg.Name, err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("read Lease %s/%s: %w", cfg.Namespace, cfg.Name, err)
	}
	holder := ptrString(cur.Spec.HolderIdentity)
	if holder != "" && holder != cfg.Identity {
		exp := expiry(cur)
		switch {
		case !exp.IsZero() && cfg.Now().After(exp):
			l.r.log.Info("taking over an expired Lease", zap.String("holder", holder))
		case cfg.HolderGone(holder):
			l.r.log.Info("taking over the Lease of a process that is gone", zap.String("holder", holder))
		default:
			e := &LeaseHeldError{Namespace: cfg.Namespace, Name: cfg.Name, Holder: holder, Expires: exp, Now: cfg.Now()}
			if cur.Spec.RenewTime != nil {
				e.RenewTime = cur.Spec.RenewTime.Time
			}
			return e
		}
	}
	next := cur.DeepCopy()
	next.Spec.HolderIdentity = &cfg.Identity
	next.Spec.LeaseDurationSeconds = &secs
	next.Spec.RenewTime = &now
	if holder != cfg.Identity {
		next.Spec.AcquireTime = &now
		t := ptrInt32(cur.Spec.LeaseTransitions) + 1
		next.Spec.LeaseTransitions = &t
	}
	if _, err := leases.Update(ctx, next, metav1.UpdateOptions{}); err != nil {
		if apierrors.IsConflict(err) {
			return errLeaseRace
		}
		return fmt.Errorf("take Lease %s/%s: %w", cfg.Namespace, cfg.Name, err)
	}
	return nil
}

// acquireWait is acquire, waiting for a held Lease when cfg.Wait is set.
func (l *lease) acquireWait(ctx context.Context) error {
	logged := ""
	for {
		err := l.acquire(ctx)
		var held *LeaseHeldError
		if err == nil || !errors.As(err, &held) || !l.r.cfg.Wait {
			return err
		}
		if logged != held.Holder {
			l.r.log.Info("waiting for the rotation Lease", zap.String("holder", held.Holder))
			logged = held.Holder
		}
		if err := sleep(ctx, l.r.cfg.PollInterval); err != nil {
			return fmt.Errorf("waiting for Lease %s/%s held by %s: %w", l.r.cfg.Namespace, l.r.cfg.Name, held.Holder, err)
		}
	}
}

// renew keeps the Lease until ctx ends. When it cannot renew for a whole
// lease duration, it calls lost and returns.
func (l *lease) renew(ctx context.Context, lost func(error)) {
	cfg := l.r.cfg
	leases := cfg.Client.CoordinationV1().Leases(cfg.Namespace)
	last := cfg.Now()
	t := time.NewTicker(cfg.LeaseDuration / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		err := func() error {
			cur, err := leases.Get(ctx, cfg.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if h := ptrString(cur.Spec.HolderIdentity); h != cfg.Identity {
				return fmt.Errorf("%w: Lease %s/%s is now held by %q", ErrLostLease, cfg.Namespace, cfg.Name, h)
			}
			now := metav1.NewMicroTime(cfg.Now())
			cur.Spec.RenewTime = &now
			_, err = leases.Update(ctx, cur, metav1.UpdateOptions{})
			return err
		}()
		switch {
		case err == nil:
			last = cfg.Now()
		case errors.Is(err, ErrLostLease):
			lost(err)
			return
		case ctx.Err() != nil:
			return
		default:
			l.r.log.Warn("renew the rotation Lease", zap.Error(err))
			if cfg.Now().Sub(last) >= cfg.LeaseDuration {
				lost(fmt.Errorf("%w: not renewed for %s: %v", ErrLostLease, cfg.LeaseDuration, err))
				return
			}
		}
	}
}

// release gives the Lease up so that the next run need not wait.
func (l *lease) release(ctx context.Context) {
	cfg := l.r.cfg
	leases := cfg.Client.CoordinationV1().Leases(cfg.Namespace)
	for attempt := 0; attempt < 3; attempt++ {
		cur, err := leases.Get(ctx, cfg.Name, metav1.GetOptions{})
		if err != nil || ptrString(cur.Spec.HolderIdentity) != cfg.Identity {
			return
		}
		cur.Spec.HolderIdentity = nil
		if _, err = leases.Update(ctx, cur, metav1.UpdateOptions{}); err == nil {
			return
		} else if !apierrors.IsConflict(err) {
			l.r.log.Warn("release the rotation Lease; it expires by itself", zap.Error(err))
			return
		}
	}
}

// ReadLease returns who holds the Lease namespace/name, for status. A
// missing Lease is a zero LeaseInfo.
func ReadLease(ctx context.Context, client kubernetes.Interface, namespace, name string) (LeaseInfo, error) {
	cur, err := client.CoordinationV1().Leases(namespace).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return LeaseInfo{}, nil
	}
	if err != nil {
		return LeaseInfo{}, fmt.Errorf("read Lease %s/%s: %w", namespace, name, err)
	}
	info := LeaseInfo{Holder: ptrString(cur.Spec.HolderIdentity)}
	if cur.Spec.RenewTime != nil {
		t := cur.Spec.RenewTime.Time
		info.RenewTime = &t
	}
	if exp := expiry(cur); !exp.IsZero() {
		info.Expires = &exp
	}
	return info, nil
}

// expiry is when a Lease lapses: its renew (or acquire) time plus its
// duration; zero when it says neither.
func expiry(l *coordinationv1.Lease) time.Time {
	t := l.Spec.RenewTime
	if t == nil {
		t = l.Spec.AcquireTime
	}
	if t == nil || l.Spec.LeaseDurationSeconds == nil {
		return time.Time{}
	}
	return t.Add(time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second)
}

// holderGone reports whether identity (HOST/PIDNS/PID) names a process on
// this host, in this PID namespace, that no longer exists.
func holderGone(identity string) bool {
	parts := strings.Split(identity, "/")
	if len(parts) != 3 {
		return false
	}
	host, _ := os.Hostname()
	ns := pidNamespace()
	if parts[0] != host || parts[1] != ns || ns == "unknown" {
		return false
	}
	pid, err := strconv.Atoi(parts[2])
	if err != nil || pid <= 0 || pid == os.Getpid() {
		return false
	}
	if errors.Is(syscall.Kill(pid, 0), syscall.ESRCH) {
		return true
	}
	// A killed child its parent has not reaped yet is a zombie: gone too.
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	_, after, ok := strings.Cut(string(stat), ") ")
	return ok && strings.HasPrefix(after, "Z")
}

// pidNamespace identifies this process's PID namespace ("4026531836"), or
// "unknown".
func pidNamespace() string {
	link, err := os.Readlink("/proc/self/ns/pid")
	if err != nil {
		return "unknown"
	}
	// "pid:[4026531836]"
	link = strings.TrimPrefix(link, "pid:[")
	return strings.TrimSuffix(link, "]")
}

func ptrString(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}

func ptrInt32(p *int32) int32 {
	if p == nil {
		return 0
	}
	return *p
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return context.Cause(ctx)
	case <-t.C:
		return nil
	}
}
