package pkcs11

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

func timeUnix(s int64) time.Time { return time.Unix(s, 0).UTC() }

func TestParseVersionOneSpelling(t *testing.T) {
	id := newVersionID(7, timeUnix(1767225600), []byte{1, 2, 3, 4, 5, 6, 7})
	v := formatVersion(id)
	if got, err := ParseVersion(v); err != nil || string(got) != string(id) {
		t.Fatalf("ParseVersion(%q) = %x, %v", v, got, err)
	}
	for _, bad := range []string{"", "0", strings.ToUpper(v), "0x" + v, v + " ", "g0", strings.Repeat("00", 65), "-1", "01\n"} {
		if _, err := ParseVersion(bad); !errors.Is(err, provider.ErrKeyNotFound) {
			t.Errorf("ParseVersion(%q) = %v; want ErrKeyNotFound", bad, err)
		}
	}
}

func TestNewestVersion(t *testing.T) {
	at := timeUnix(1767225600)
	mk := func(counter uint32, rnd byte, created time.Time) versionID {
		return parseID(newVersionID(counter, created, []byte{rnd, 0, 0, 0, 0, 0, 0}))
	}
	v1 := mk(1, 9, at)
	v2 := mk(2, 1, at.Add(-time.Hour)) // a clock behind does not matter
	v2b := mk(2, 2, at)                // a concurrent rotation: the greater ID wins
	foreign := parseID([]byte{0xff, 0xff})
	if !v2.newer(v1) || v1.newer(v2) {
		t.Errorf("counter 2 is not newer than counter 1")
	}
	if !v2b.newer(v2) || v2.newer(v2b) {
		t.Errorf("ties are not broken by the CKA_ID")
	}
	if !v1.newer(foreign) || foreign.counter != 0 || !foreign.created.IsZero() {
		t.Errorf("a foreign CKA_ID is not older than the provider's versions: %+v", foreign)
	}
	if v1.created != at || v1.counter != 1 {
		t.Errorf("parseID lost the counter or creation time: %+v", v1)
	}
}
