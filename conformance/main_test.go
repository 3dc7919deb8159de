package main

import (
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

func TestExpectedList(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "expected.txt")
	list := "# comment\n\ndiffers e2e TestA membership answered by the proxy\ndiffers e2e TestB/sub refused\n" +
		"skip e2e TestC panics\nskip e2e TestD.x needs a binary\n"
	if err := os.WriteFile(path, []byte(list), 0o644); err != nil {
		t.Fatal(err)
	}
	exp, err := readExpected(path)
	if err != nil {
		t.Fatal(err)
	}
	for test, want := range map[string]bool{"TestA": true, "TestA/sub/x": true, "TestB/sub": true, "TestB": false,
		"TestB/other": false, "TestC": false, "TestAB": false} {
		if got := exp.differs("e2e", test); got != want {
			t.Errorf("differs(e2e, %s) = %v, want %v", test, got, want)
		}
	}
	if exp.differs("integration", "TestA") {
		t.Error("an entry of e2e matched in integration")
	}
	skip := regexp.MustCompile(exp.skipRegexp())
	for test, want := range map[string]bool{"TestC": true, "TestD.x": true, "TestDax": false, "TestCC": false} {
		if got := skip.MatchString(test); got != want {
			t.Errorf("skip matches %s = %v, want %v", test, got, want)
		}
	}

	bad := filepath.Join(t.TempDir(), "bad.txt")
	if err := os.WriteFile(bad, []byte("differs e2e TestA\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := readExpected(bad); err == nil || !strings.Contains(err.Error(), "bad.txt:1") {
		t.Errorf("a line without a reason: got %v, want an error naming the line", err)
	}
}

// TestClassify: a failed test is expected-different through ours only when every failing leaf is listed; the
// anchor has no expected differences.
func TestClassify(t *testing.T) {
	t.Parallel()
	exp := &expected{differ: map[string]bool{"e2e TestListed": true, "e2e TestSub/refused": true}}
	tests := map[string]string{
		"TestPass": "pass", "TestSkip": "skip", "TestListed": "fail", "TestOther": "fail",
		"TestSub": "fail", "TestSub/refused": "fail", "TestSub/ok": "pass",
		"TestMixed": "fail", "TestMixed/refused": "fail", "TestMixed/broken": "fail",
		"TestListedPasses": "pass",
	}
	exp.differ["e2e TestMixed/refused"] = true
	exp.differ["e2e TestListedPasses"] = true
	classify := func(variant string) *pkgResult {
		r := &pkgResult{Package: "e2e", Variant: variant, Tests: tests, order: slices.Sorted(maps.Keys(tests))}
		r.classify(exp)
		return r
	}
	ours := classify("ours")
	check := func(what string, got, want []string) {
		t.Helper()
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Errorf("%s = %v, want %v", what, got, want)
		}
	}
	check("ours passed", ours.Passed, []string{"TestListedPasses", "TestPass"})
	check("ours skipped", ours.Skipped, []string{"TestSkip"})
	check("ours expected-different", ours.ExpectedDifferent, []string{"TestListed", "TestSub"})
	check("ours failing", ours.Failing, []string{"TestMixed", "TestOther"})
	check("ours expected but passed", ours.ExpectedButPassed, []string{"TestListedPasses"})
	anchor := classify("anchor")
	check("anchor failing", anchor.Failing, []string{"TestListed", "TestMixed", "TestOther", "TestSub"})
	check("anchor expected-different", anchor.ExpectedDifferent, nil)
}
