package proxy

import "testing"

// TestWatchJoinSeen: a watch that joins a shared group at a revision its log still holds has seen nothing yet —
// its seen revision is the one before its start, not the group's: a progress answer (the least seen revision of
// the stream's watches) sent before the watch's first flush would otherwise claim events not yet sent.
func TestWatchJoinSeen(t *testing.T) {
	g := &watchGroup{shared: true, base: 10, created: 10, rev: 20, sessions: map[*watchSession]int{}}
	for r := int64(11); r <= 20; r++ {
		g.log = append(g.log, &watchEntry{kind: entryEvents, rev: r})
	}
	w := &clientWatch{}
	if !g.join(&watchSession{}, w, 15) {
		t.Fatal("join at 15 refused; the log holds 11…20")
	}
	if w.cursor != 4 || w.next != 15 || w.rev != 14 {
		t.Errorf("joined at 15: cursor %d, next %d, seen up to %d; want 4, 15, 14", w.cursor, w.next, w.rev)
	}
}
