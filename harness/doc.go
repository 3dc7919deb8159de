// Package harness starts real etcd topologies for tests and for the demo: generated PKI, embedded members (or
// member processes: of etcd 3.6/3.7, and of the pinned etcd for the failures an embedded member cannot have, such
// as SIGKILL and SIGSTOP), the stock v2 proxy and grpc-proxy, chains of proxies described as data, the pinned
// etcdctl.
package harness
