package main

// The probe image's commands (rehearsal.invalid/probe:v1, Entrypoint
// ["/rehearsal", "probe"]), for the DNS and Service checks:
//
//	rehearsal probe serve [--listen :8080]      HTTP: GET / answers "pod=HOSTNAME node=$NODE_NAME\n"
//	rehearsal probe get URL [--timeout 30s]     print the body of the first 200 answer (exit 0)
//	rehearsal probe resolve NAME [--timeout 30s] print NAME's addresses, one a line (Go's resolver,
//	                                             /etc/resolv.conf and /etc/hosts)
//
// get and resolve retry every half second until --timeout.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func probeMain(args []string) error {
	if len(args) == 0 {
		return errors.New("usage: rehearsal probe serve [--listen :8080] | get URL [--timeout D] | resolve NAME [--timeout D]")
	}
	fl := flag.NewFlagSet("probe "+args[0], flag.ContinueOnError)
	listen := fl.String("listen", ":8080", "serve: address to listen on")
	timeout := fl.Duration("timeout", 30*time.Second, "get, resolve: retry until this long has passed")
	// Flags may come before or after the one operand.
	var operands []string
	for rest := args[1:]; ; {
		if err := fl.Parse(rest); err != nil {
			return err
		}
		if rest = fl.Args(); len(rest) == 0 {
			break
		}
		operands, rest = append(operands, rest[0]), rest[1:]
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	want := 1
	if args[0] == "serve" {
		want = 0
	}
	if len(operands) != want {
		return fmt.Errorf("probe %s: want %d operand(s), got %q", args[0], want, operands)
	}
	switch args[0] {
	case "serve":
		return probeServe(ctx, *listen)
	case "get":
		return probeRetry(ctx, *timeout, func(ctx context.Context) error { return probeGet(ctx, operands[0]) })
	case "resolve":
		r := &net.Resolver{PreferGo: true}
		return probeRetry(ctx, *timeout, func(ctx context.Context) error {
			addrs, err := r.LookupHost(ctx, operands[0])
			for _, a := range addrs {
				fmt.Println(a)
			}
			return err
		})
	}
	return fmt.Errorf("probe %s: unknown; use serve, get or resolve", args[0])
}

func probeServe(ctx context.Context, listen string) error {
	host, _ := os.Hostname()
	answer := fmt.Sprintf("pod=%s node=%s\n", host, os.Getenv("NODE_NAME"))
	srv := &http.Server{Addr: listen, ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, answer)
	})}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	fmt.Fprintf(os.Stderr, "probe: serving %q on %s\n", answer, listen)
	if err := srv.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func probeGet(ctx context.Context, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %q", url, resp.Status, body)
	}
	_, err = os.Stdout.Write(body)
	return err
}

// probeRetry runs try (each attempt limited to 2 s) until it succeeds or
// timeout has passed, then returns its last error.
func probeRetry(ctx context.Context, timeout time.Duration, try func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		attempt, done := context.WithTimeout(ctx, 2*time.Second)
		err := try(attempt)
		done()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("gave up after %s: %w", timeout, err)
		case <-time.After(500 * time.Millisecond):
		}
	}
}
