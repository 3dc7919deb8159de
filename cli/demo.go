package cli

import (
	"fmt"
	"io"
)

func demo(args []string, stdout, stderr io.Writer) int {
	fmt.Fprintln(stderr, "demo: not yet")
	return exitError
}
