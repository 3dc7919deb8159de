package proxy

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/crypt"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// encryptionCollector reports what the encryption rule and its keys did, read from their counters at each
// scrape: per key, the values encrypted, decrypted, read stale (a later key, or plaintext: rewrap them) and
// failed; and the prev_kvs left out and the watches canceled because a value did not decrypt.
type encryptionCollector struct {
	keys *crypt.Keyring
	rule *rules.Encrypt
}

var (
	encValuesDesc = prometheus.NewDesc(MetricsNamespace+"_encryption_values_total",
		"Values by encryption key and result: encrypted, decrypted, stale (decrypted by another key than the first, or plaintext read as it is; a subset of decrypted), failed (did not decrypt). key is empty for failures that name no key of the keyring (plaintext refused, unknown key, malformed).",
		[]string{"key", "result"}, nil)
	encDroppedDesc = prometheus.NewDesc(MetricsNamespace+"_encryption_dropped_total",
		"Answers changed because a value did not decrypt: what=prev_kv (left out of an applied write's answer), what=watch (the watch canceled).",
		[]string{"what"}, nil)
)

func (c encryptionCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- encValuesDesc
	ch <- encDroppedDesc
}

func (c encryptionCollector) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	for _, s := range c.keys.Stats() {
		counter(encValuesDesc, s.Encryptions, s.Key, "encrypted")
		counter(encValuesDesc, s.Decryptions, s.Key, "decrypted")
		counter(encValuesDesc, s.Stale, s.Key, "stale")
		counter(encValuesDesc, s.Failures, s.Key, "failed")
	}
	counter(encValuesDesc, c.keys.UnattributedFailures(), "", "failed")
	counter(encDroppedDesc, c.rule.PrevKVsDropped(), "prev_kv")
	counter(encDroppedDesc, c.rule.WatchesCanceled(), "watch")
}

// encryptRuleOf finds the encryption rule of a chain, nil when there is none.
func encryptRuleOf(rs []rules.Rule) *rules.Encrypt {
	for _, r := range rs {
		if e, ok := r.(*rules.Encrypt); ok && len(e.Prefixes) > 0 {
			return e
		}
	}
	return nil
}
