// pause is PID 1 of every pod sandbox on the real node: it holds the pod's namespaces open, reaps the
// orphans that get re-parented to it, and exits 0 on SIGTERM or SIGINT.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

// prctl(PR_SET_CHILD_SUBREAPER): when not PID 1 (run by hand), still become the orphans' parent.
const prSetChildSubreaper = 36

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-v" {
		fmt.Println("pythontask pause 1")
		return
	}
	if os.Getpid() != 1 {
		if _, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0); errno != 0 {
			fmt.Fprintln(os.Stderr, "pause: not PID 1 and cannot become a subreaper:", errno)
		}
	}
	signals := make(chan os.Signal, 16)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range signals {
		if sig == syscall.SIGCHLD {
			reap()
			continue
		}
		fmt.Fprintln(os.Stderr, "pause: shutting down on", sig)
		os.Exit(0)
	}
}

// reap collects every child that has exited; SIGCHLD signals coalesce, so one may stand for many.
func reap() {
	for {
		var status syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}
