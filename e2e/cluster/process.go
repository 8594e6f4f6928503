package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// stopTimeout bounds how long Stop waits after SIGTERM before it sends SIGKILL.
const stopTimeout = 15 * time.Second

// Process is one run-at-a-time child process whose output is appended to a
// log file. It can be started again after it exits, with the same arguments.
type Process struct {
	Name    string   // short name used in errors, "etcd", "kube-apiserver", ...
	Path    string   // binary
	Args    []string // arguments, without the binary
	LogPath string   // stdout and stderr of every run are appended here
	// TermSignalOK makes Stop count death by its own SIGTERM as a clean
	// exit (etcd re-raises the signal after its graceful shutdown).
	TermSignalOK bool
	// Env holds KEY=VALUE pairs added to the test process's environment.
	Env []string

	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{} // closed when the current run has exited
	waitErr error         // valid once done is closed
}

// Start starts the process. It is an error to start a process that is
// still running.
func (p *Process) Start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil && !isClosed(p.done) {
		return fmt.Errorf("%s: already running (pid %d)", p.Name, p.cmd.Process.Pid)
	}
	logFile, err := os.OpenFile(p.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("%s: open log: %w", p.Name, err)
	}
	fmt.Fprintf(logFile, "\n===== %s: start %s %s =====\n", time.Now().Format(time.RFC3339Nano), p.Path, strings.Join(p.Args, " "))
	cmd := exec.Command(p.Path, p.Args...)
	if len(p.Env) > 0 {
		cmd.Env = append(os.Environ(), p.Env...)
	}
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	// Kill the child if the test process dies without running its cleanup.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return fmt.Errorf("%s: start %s: %w", p.Name, p.Path, err)
	}
	done := make(chan struct{})
	p.cmd, p.done, p.waitErr = cmd, done, nil
	go func() {
		err := cmd.Wait()
		logFile.Close()
		p.mu.Lock()
		p.waitErr = err
		p.mu.Unlock()
		close(done)
	}()
	return nil
}

// Running reports whether the process has been started and not yet exited.
func (p *Process) Running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd != nil && !isClosed(p.done)
}

// Exited returns a channel closed when the current run exits (a closed
// channel if the process never started).
func (p *Process) Exited() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done == nil {
		c := make(chan struct{})
		close(c)
		return c
	}
	return p.done
}

// ExitError returns how the last run ended; nil while running or after a
// clean exit.
func (p *Process) ExitError() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done == nil || !isClosed(p.done) {
		return nil
	}
	return p.waitErr
}

// Stop sends SIGTERM and waits for the process to exit; after stopTimeout it
// sends SIGKILL and reports that the graceful stop failed. It returns the
// process's exit error (nil for exit status 0). Stopping a process that is
// not running is a no-op.
func (p *Process) Stop() error {
	return p.signalAndWait(syscall.SIGTERM, stopTimeout)
}

// Kill sends SIGKILL and waits for the process to exit. Killing a process
// that is not running is a no-op.
func (p *Process) Kill() error {
	err := p.signalAndWait(syscall.SIGKILL, stopTimeout)
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) {
		return nil // a killed process does not exit cleanly, by design
	}
	return err
}

func (p *Process) signalAndWait(sig syscall.Signal, timeout time.Duration) error {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if cmd == nil || isClosed(done) {
		return nil
	}
	if err := cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("%s: send %v: %w", p.Name, sig, err)
	}
	select {
	case <-done:
	case <-time.After(timeout):
		_ = cmd.Process.Kill()
		<-done
		return fmt.Errorf("%s: did not exit within %v of %v; killed", p.Name, timeout, sig)
	}
	err := p.ExitError()
	var exitErr *exec.ExitError
	if p.TermSignalOK && sig == syscall.SIGTERM && errors.As(err, &exitErr) {
		if ws, ok := exitErr.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGTERM {
			return nil
		}
	}
	if err != nil {
		return fmt.Errorf("%s: exited after %v: %w", p.Name, sig, err)
	}
	return nil
}

// LogTail returns the last n lines of the process log.
func (p *Process) LogTail(n int) string {
	data, err := os.ReadFile(p.LogPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	lines := bytes.Split(bytes.TrimRight(data, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// waitUntil calls cond every interval until it returns true, ctx ends,
// timeout passes or p (if non-nil) exits. The error names what was awaited
// and, on timeout, the last error cond returned.
func waitUntil(ctx context.Context, p *Process, timeout, interval time.Duration, what string, cond func(ctx context.Context) (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var exited <-chan struct{}
	if p != nil {
		exited = p.Exited()
	}
	start := time.Now()
	var lastErr error
	for {
		ok, err := cond(ctx)
		if ok {
			return nil
		}
		if err != nil {
			lastErr = err
		}
		select {
		case <-exited:
			return fmt.Errorf("waiting for %s: %s exited (%v) after %v; log tail:\n%s",
				what, p.Name, p.ExitError(), time.Since(start).Round(time.Millisecond), p.LogTail(30))
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: gave up after %v (last error: %v)", what, time.Since(start).Round(time.Millisecond), lastErr)
		case <-time.After(interval):
		}
	}
}

// CPUTime is the user plus system CPU time the running process has used so
// far, read from /proc. It fails when the process is not running.
func (p *Process) CPUTime() (time.Duration, error) {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if cmd == nil || isClosed(done) {
		return 0, fmt.Errorf("%s is not running", p.Name)
	}
	return ProcCPUTime(cmd.Process.Pid)
}

// ProcCPUTime reads the user plus system CPU time of process pid from
// /proc/PID/stat (fields 14 and 15, in clock ticks of 1/100 s on Linux).
func ProcCPUTime(pid int) (time.Duration, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may contain spaces; fields restart after
	// its closing parenthesis, at field 3.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	var ticks int64
	for _, s := range f[11:13] {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * 10 * time.Millisecond, nil
}
