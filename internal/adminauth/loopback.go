package adminauth

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
)

// IsLoopback reports whether addr, HOST:PORT, listens on or names the
// loopback interface only: an IP in 127.0.0.0/8, ::1 (also as
// ::ffff:127.x.y.z), or the name "localhost". An empty host, 0.0.0.0, ::
// and every other name or address are not loopback. It returns an error
// when addr is not HOST:PORT.
func IsLoopback(addr string) (bool, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false, fmt.Errorf("adminauth: address %q: %w", addr, err)
	}
	if strings.EqualFold(host, "localhost") {
		return true, nil
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return false, nil // a host name other than localhost
	}
	return ip.Unmap().IsLoopback(), nil
}
