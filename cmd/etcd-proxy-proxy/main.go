// Command etcd-proxy-proxy is a reverse proxy for etcd's client API that answers every membership view with
// itself. See the README.
package main

import (
	"os"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/cli"
)

func main() { os.Exit(cli.Main(os.Args, os.Stdout, os.Stderr)) }
