package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/yaml"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/crypt"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// encryptionCollector reports what the encryption rule and its keys did, read from their counters at each
// scrape: per key name (summed over the keyrings that hold one), the values encrypted, decrypted, read stale (a
// later key, or plaintext: rewrap them) and failed; and the prev_kvs left out and the watches canceled because a
// value did not decrypt. A reload of the configuration starts the keys' counts again (a counter reset).
type encryptionCollector struct {
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
	byName := map[string]*crypt.Stats{}
	var names []string
	var unattributed uint64
	for _, ring := range c.rule.Keyrings() {
		unattributed += ring.UnattributedFailures()
		for _, s := range ring.Stats() {
			sum := byName[s.Key]
			if sum == nil {
				sum = &crypt.Stats{Key: s.Key}
				byName[s.Key] = sum
				names = append(names, s.Key)
			}
			sum.Encryptions += s.Encryptions
			sum.Decryptions += s.Decryptions
			sum.Stale += s.Stale
			sum.Failures += s.Failures
		}
	}
	for _, name := range names {
		s := byName[name]
		counter(encValuesDesc, s.Encryptions, s.Key, "encrypted")
		counter(encValuesDesc, s.Decryptions, s.Key, "decrypted")
		counter(encValuesDesc, s.Stale, s.Key, "stale")
		counter(encValuesDesc, s.Failures, s.Key, "failed")
	}
	counter(encValuesDesc, unattributed, "", "failed")
	counter(encDroppedDesc, c.rule.PrevKVsDropped(), "prev_kv")
	counter(encDroppedDesc, c.rule.WatchesCanceled(), "watch")
}

// encryptRuleOf finds the encryption rule of a chain, nil when there is none.
func encryptRuleOf(rs []rules.Rule) *rules.Encrypt {
	for _, r := range rs {
		if e, ok := r.(*rules.Encrypt); ok && (len(e.Prefixes) > 0 || e.Resources != nil) {
			return e
		}
	}
	return nil
}

// encryptionConfigFile is what --encryption-config holds (YAML or JSON): sets of key prefixes, each with its
// providers in order — the first encrypts, all decrypt.
type encryptionConfigFile struct {
	Resources []struct {
		Prefixes  []string `json:"prefixes"`
		Providers []struct {
			KeyFile  string    `json:"keyFile,omitempty"`
			Identity *struct{} `json:"identity,omitempty"`
		} `json:"providers"`
	} `json:"resources"`
}

// loadEncryptionConfig reads --encryption-config and the key files it names, reporting every problem.
func loadEncryptionConfig(file string) ([]rules.EncryptResource, []string, []error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, nil, []error{fmt.Errorf("--encryption-config: %w", err)}
	}
	var cf encryptionConfigFile
	if err := yaml.UnmarshalStrict(data, &cf); err != nil {
		return nil, nil, []error{fmt.Errorf("--encryption-config %s: %w", file, err)}
	}
	var (
		errs  []error
		out   []rules.EncryptResource
		files []string
		seen  = map[string]int{}
	)
	add := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("--encryption-config %s: "+format, append([]any{file}, args...)...))
	}
	if len(cf.Resources) == 0 {
		add("no resources")
	}
	for i, r := range cf.Resources {
		if len(r.Prefixes) == 0 {
			add("resources[%d]: no prefixes", i)
		}
		for _, p := range r.Prefixes {
			if j, dup := seen[p]; dup {
				add("resources[%d]: prefix %q is also in resources[%d]", i, p, j)
			}
			seen[p] = i
		}
		if len(r.Providers) == 0 {
			add("resources[%d]: no providers", i)
		}
		var keys []*crypt.Key
		for j, p := range r.Providers {
			switch {
			case (p.KeyFile != "") == (p.Identity != nil):
				add("resources[%d].providers[%d]: want one of keyFile, identity", i, j)
			case p.Identity != nil:
				keys = append(keys, crypt.IdentityKey())
			default:
				files = append(files, p.KeyFile)
				k, err := crypt.LoadKeyFile(p.KeyFile)
				if err != nil {
					add("resources[%d].providers[%d]: %v", i, j, err)
					continue
				}
				keys = append(keys, k)
			}
		}
		if len(keys) == len(r.Providers) && len(keys) > 0 {
			ring, err := crypt.NewKeyring(keys...)
			if err != nil {
				add("resources[%d]: %v", i, err)
				continue
			}
			out = append(out, rules.EncryptResource{Prefixes: r.Prefixes, Keys: ring})
		}
	}
	if errs != nil {
		return nil, nil, errs
	}
	return out, files, nil
}

// encryptionReloader re-reads --encryption-config and its key files on SIGHUP and when they change; a reload
// that fails keeps what was loaded before, and logs why.
type encryptionReloader struct {
	file string
	rule *rules.Encrypt
	log  *slog.Logger

	mu     sync.Mutex
	files  []string // the config and the key files it named when last read
	stamps []fileStamp
}

// currentStamps are the files' stamps as the certificates' poller takes them (reload.go).
func (r *encryptionReloader) currentStamps() []fileStamp {
	var st []fileStamp
	for _, f := range r.files {
		fi, err := os.Stat(f)
		if err != nil {
			st = append(st, fileStamp{err: true})
			continue
		}
		st = append(st, fileStamp{modTime: fi.ModTime(), size: fi.Size()})
	}
	return st
}

// reload re-reads the configuration (with onlyIfChanged: only when a file changed since the last attempt).
func (r *encryptionReloader) reload(onlyIfChanged bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	stamps := r.currentStamps()
	if onlyIfChanged && slices.Equal(stamps, r.stamps) {
		return nil
	}
	r.stamps = stamps
	rs, files, errs := loadEncryptionConfig(r.file)
	if errs != nil {
		err := errors.Join(errs...)
		r.log.Error("encryption configuration reload failed; keeping the previous keys", "err", err)
		return err
	}
	r.rule.SetResources(rs)
	r.files = append([]string{r.file}, files...)
	r.stamps = r.currentStamps()
	r.log.Info("encryption configuration loaded", "file", r.file, "resources", len(rs))
	return nil
}

// poll reloads when a file changed, every interval, until ctx ends.
func (r *encryptionReloader) poll(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		_ = r.reload(true)
	}
}
