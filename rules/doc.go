// Package rules holds the Rule interface and the built-in rules that etcd-proxy-proxy applies to requests and
// responses.
package rules
