// Package proxy is etcd-proxy-proxy's server: configuration, listeners with their own TLS, and the forwarder
// that sends every request to the upstream through the rule chain.
package proxy
