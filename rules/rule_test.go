package rules

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"testing"
)

func TestNewSelfID(t *testing.T) {
	t.Parallel()
	a := []string{"http://10.0.0.1:2379", "https://proxy.example:2379", "http://localhost:4001"}
	tests := []struct {
		name   string
		x, y   []string
		sameID bool
	}{
		{name: "same URLs", x: a, y: slices.Clone(a), sameID: true},
		{name: "any order", x: a, y: []string{a[2], a[0], a[1]}, sameID: true},
		{name: "reversed", x: a, y: []string{a[2], a[1], a[0]}, sameID: true},
		{name: "one URL fewer", x: a, y: a[:2]},
		{name: "another port", x: []string{"http://10.0.0.1:2379"}, y: []string{"http://10.0.0.1:2380"}},
		{name: "another scheme", x: []string{"http://10.0.0.1:2379"}, y: []string{"https://10.0.0.1:2379"}},
		{name: "joined differently", x: []string{"http://a:1", "http://b:2"}, y: []string{"http://a:1http://b:2"}},
		{name: "none and one", x: nil, y: []string{"http://a:1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			x, y := NewSelf("n", tt.x), NewSelf("other-name", tt.y)
			if (x.ID == y.ID) != tt.sameID {
				t.Errorf("IDs %s and %s: same = %v, want %v", x.IDString(), y.IDString(), x.ID == y.ID, tt.sameID)
			}
		})
	}
}

func TestNewSelfKeepsURLs(t *testing.T) {
	t.Parallel()
	in := []string{"http://b:2", "http://a:1"}
	s := NewSelf("name", in)
	if s.Name != "name" || !slices.Equal(s.ClientURLs, []string{"http://b:2", "http://a:1"}) {
		t.Errorf("NewSelf = %+v, want the name and the URLs in the given order", s)
	}
	if !slices.Equal(in, []string{"http://b:2", "http://a:1"}) {
		t.Errorf("NewSelf reordered its argument: %q", in)
	}
	in[0] = "http://changed:3"
	if s.ClientURLs[0] != "http://b:2" {
		t.Error("Self.ClientURLs shares the caller's slice")
	}
}

func TestNewSelfNeverZero(t *testing.T) {
	t.Parallel()
	hex := regexp.MustCompile(`^[1-9a-f][0-9a-f]*$`)
	seen := map[uint64]bool{}
	for i := range 2000 {
		s := NewSelf("n", []string{fmt.Sprintf("http://10.0.%d.%d:2379", i/256, i%256)})
		if s.ID == 0 {
			t.Fatalf("ID 0 for %q", s.ClientURLs)
		}
		if seen[s.ID] {
			t.Fatalf("ID %x repeated", s.ID)
		}
		seen[s.ID] = true
		if id := s.IDString(); !hex.MatchString(id) {
			t.Fatalf("IDString %q is not lower-case hex without leading zeros", id)
		}
	}
}

func TestIDString(t *testing.T) {
	t.Parallel()
	tests := []struct {
		id   uint64
		want string
	}{
		{1, "1"},
		{0xabc, "abc"},
		{0x0000f00d, "f00d"},
		{0x8e9e05c52164694d, "8e9e05c52164694d"},
		{0x0123456789abcdef, "123456789abcdef"},
		{^uint64(0), "ffffffffffffffff"},
	}
	for _, tt := range tests {
		t.Run(strconv.FormatUint(tt.id, 10), func(t *testing.T) {
			t.Parallel()
			if got := (Self{ID: tt.id}).IDString(); got != tt.want {
				t.Errorf("IDString(%#x) = %q, want %q", tt.id, got, tt.want)
			}
		})
	}
}
