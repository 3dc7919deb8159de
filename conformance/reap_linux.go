package main

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// becomeSubreaper makes the processes a test leaves behind ours when the test's process exits (the suite's
// processes run in their own sessions, so a process group would not catch them).
func becomeSubreaper() error {
	const prSetChildSubreaper = 36
	if _, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0); errno != 0 {
		return errno
	}
	return nil
}

// reapOrphans kills and reaps every child process left: run between tests, when none of ours is running, these
// are what the last test started and did not stop. It returns their executables' names.
func reapOrphans() []string {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	self := os.Getpid()
	var names []string
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'.
		rest := string(stat[strings.LastIndexByte(string(stat), ')')+1:])
		fields := strings.Fields(rest)
		if len(fields) < 2 || fields[1] != strconv.Itoa(self) {
			continue
		}
		zombie := fields[0] == "Z" // exited, not yet waited for: nothing left running
		name := "?"
		if cmd, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline")); err == nil {
			name = filepath.Base(strings.SplitN(string(cmd), "\x00", 2)[0])
		}
		_ = syscall.Kill(pid, syscall.SIGKILL)
		var ws syscall.WaitStatus
		_, _ = syscall.Wait4(pid, &ws, 0, nil)
		if !zombie {
			names = append(names, name)
		}
	}
	return names
}
