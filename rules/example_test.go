package rules_test

import (
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// servedBy marks every response. Passthrough supplies the request side it does not need.
type servedBy struct{ rules.Passthrough }

func (servedBy) Name() string { return "served-by" }

func (servedBy) Response(resp *http.Response) (rules.BodyFunc, error) {
	resp.Header.Set("X-Served-By", "etcd-proxy-proxy")
	return nil, nil // no body claimed: the response streams through
}

// A user-defined rule added to the end of the default chain: its request side runs last and its response side
// first.
func Example_responseRule() {
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, `{"action":"get"}`)
	}))
	defer upstream.Close()

	srv, err := proxy.New(proxy.Config{
		Upstreams:        []string{upstream.URL},
		ListenClientURLs: []string{"http://127.0.0.1:0"},
	},
		proxy.WithLogger(slog.New(slog.DiscardHandler)),
		proxy.WithRules(func(defaults []rules.Rule, _ rules.Self) []rules.Rule {
			return append(defaults, servedBy{})
		}),
	)
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := srv.Start(); err != nil {
		fmt.Println(err)
		return
	}
	defer srv.Close()

	resp, err := http.Get(srv.URLs()[0] + "/v2/keys/foo")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer resp.Body.Close()
	fmt.Println(resp.Status, resp.Header.Get("X-Served-By"))
	// Output: 200 OK etcd-proxy-proxy
}
