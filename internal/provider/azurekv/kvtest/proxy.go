package kvtest

import (
	"io"
	"net"
	"net/http"
	"time"
)

// serveProxy is an HTTP proxy: CONNECT tunnels to the TLS listener for the
// host names it serves, and plain requests for the IMDS address are answered
// by the IMDS handler.
func (s *Server) serveProxy(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodConnect {
		if r.URL.IsAbs() && r.URL.Hostname() == IMDSHost {
			s.serveIMDS(w, r)
			return
		}
		http.Error(w, "kvtest proxy: only CONNECT and IMDS", http.StatusForbidden)
		return
	}
	s.count("connect")
	host, port, err := net.SplitHostPort(r.Host)
	if err != nil || port != "443" || !s.serves(host) {
		http.Error(w, "kvtest proxy: unknown host "+r.Host, http.StatusForbidden)
		return
	}
	upstream, err := net.DialTimeout("tcp", s.tlsLn.Addr().String(), 5*time.Second)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	hj, ok := w.(http.Hijacker)
	if !ok {
		upstream.Close()
		http.Error(w, "kvtest proxy: cannot hijack", http.StatusInternalServerError)
		return
	}
	conn, rw, err := hj.Hijack()
	if err != nil {
		upstream.Close()
		return
	}
	if _, err := rw.WriteString("HTTP/1.1 200 Connection established\r\n\r\n"); err != nil || rw.Flush() != nil {
		conn.Close()
		upstream.Close()
		return
	}
	go tunnel(upstream, rw.Reader, conn)
	go tunnel(conn, upstream, upstream)
}

// tunnel copies src to dst and closes both ends when done.
func tunnel(dst io.WriteCloser, src io.Reader, srcCloser io.Closer) {
	_, _ = io.Copy(dst, src)
	_ = dst.Close()
	_ = srcCloser.Close()
}
