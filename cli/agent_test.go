package cli

import (
	"strings"
	"testing"
)

// The agent subcommand's bad flags: every problem in one message, exit status 2, as the proxy's.
func TestAgentBadFlags(t *testing.T) {
	t.Parallel()
	code, stdout, stderr := run("agent", "--bogus", "--tunnel-server", "http://h:1", "--allow", "noport", "--log-format", "xml")
	if code != 2 || stdout != "" {
		t.Errorf("exit status %d, stdout %q; want 2 and nothing", code, stdout)
	}
	for _, want := range []string{"unknown flag --bogus", `--tunnel-server "http://h:1": scheme must be konnectivity or https`,
		`--allow "noport": want host:port`, `--log-format "xml"`} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr does not say %q:\n%s", want, stderr)
		}
	}
}
