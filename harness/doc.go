// Package harness starts real etcd topologies for tests and for the demo: generated PKI, embedded members (or
// etcd 3.6/3.7 members as processes), the stock v2 proxy and grpc-proxy, chains of proxies described as data,
// the pinned etcdctl, and member processes of the pinned etcd for the failures an embedded member cannot have
// (SIGKILL, SIGSTOP).
package harness
