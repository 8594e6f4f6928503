package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// CommandResult is how a one-shot command ended.
type CommandResult struct {
	// ExitCode is the exit status; 128+N when killed by signal N (as a
	// shell reports it); -1 when it did not start.
	ExitCode       int
	Stdout, Stderr []byte
	Duration       time.Duration
	// MaxRSS is the peak resident set size of the process (wait4 rusage
	// ru_maxrss), in bytes.
	MaxRSS int64
	// CPU is the user plus system CPU time the process used (rusage).
	CPU time.Duration
}

// String summarises the result for failure messages: exit code, duration
// and the last lines of stderr.
func (r CommandResult) String() string {
	return fmt.Sprintf("exit %d after %v; stderr (last 30 lines):\n%s", r.ExitCode, r.Duration.Round(time.Millisecond), lastLines(string(r.Stderr), 30))
}

// Command is a one-shot command whose exit status the test examines (unlike
// RunPlugin, a non-zero exit is a result, not an error).
type Command struct {
	Binary string
	Args   []string
	// Env holds KEY=VALUE pairs added to the test process's environment.
	Env []string
	// Stdin, when set, is the command's standard input.
	Stdin io.Reader
	// Timeout bounds the run; the process is killed after it. Zero means
	// 10 minutes.
	Timeout time.Duration
	// LogPath, when set, receives a copy of stderr (appended).
	LogPath string
}

// Run runs the command and waits. The error is non-nil only when the
// command could not start or ran into its timeout (then the result still
// holds what it printed).
func (c Command) Run(ctx context.Context) (CommandResult, error) {
	_, wait, err := c.Start(ctx)
	if err != nil {
		return CommandResult{ExitCode: -1}, err
	}
	return wait()
}

// Start starts the command and returns its process ID; wait waits for it
// and returns what Run returns. wait must be called.
func (c Command) Start(ctx context.Context) (pid int, wait func() (CommandResult, error), err error) {
	timeout := c.Timeout
	if timeout == 0 {
		timeout = 10 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	cmd := exec.CommandContext(ctx, c.Binary, c.Args...)
	if len(c.Env) > 0 {
		cmd.Env = append(os.Environ(), c.Env...)
	}
	cmd.Stdin = c.Stdin
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	var logFile *os.File
	if c.LogPath != "" {
		f, err := os.OpenFile(c.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			cancel()
			return 0, nil, err
		}
		logFile = f
		fmt.Fprintf(f, "\n===== %s: %s %s =====\n", time.Now().Format(time.RFC3339Nano), c.Binary, strings.Join(c.Args, " "))
		cmd.Stderr = io.MultiWriter(&stderr, f)
	} else {
		cmd.Stderr = &stderr
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		cancel()
		if logFile != nil {
			logFile.Close()
		}
		return 0, nil, fmt.Errorf("start %s: %w", c.Binary, err)
	}
	finish := func() (CommandResult, error) {
		defer cancel()
		waitErr := cmd.Wait()
		if logFile != nil {
			logFile.Close()
		}
		res := CommandResult{Stdout: stdout.Bytes(), Stderr: stderr.Bytes(), Duration: time.Since(start)}
		if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
			res.MaxRSS = ru.Maxrss * 1024 // kilobytes on Linux
			res.CPU = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
		}
		res.ExitCode = exitCode(cmd.ProcessState)
		if ctx.Err() != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return res, fmt.Errorf("%s %s: killed after its timeout of %v; %s", c.Binary, strings.Join(c.Args, " "), timeout, res)
		}
		var exitErr *exec.ExitError
		if waitErr != nil && !errors.As(waitErr, &exitErr) {
			return res, waitErr
		}
		return res, nil
	}
	return cmd.Process.Pid, finish, nil
}

func exitCode(ps *os.ProcessState) int {
	if ps == nil {
		return -1
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ps.ExitCode()
}
