package kvtest

// count records one call of op.
func (s *Server) count(op string) {
	s.mu.Lock()
	s.calls[op]++
	s.mu.Unlock()
}

// Calls returns how many requests of op the server received, whatever their
// outcome. Vault operations: get, list, wrapkey, unwrapkey, encrypt,
// decrypt, create, rotate, update. Others: token (Entra token endpoint),
// discovery (Entra metadata), imds, connect (proxy tunnels).
func (s *Server) Calls(op string) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls[op]
}

// AllCalls returns a copy of every counter.
func (s *Server) AllCalls() map[string]int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]int64, len(s.calls))
	for k, v := range s.calls {
		out[k] = v
	}
	return out
}

// VaultCalls is the number of requests the vault received, all operations
// together (unauthenticated challenge requests and failed ones included).
func (s *Server) VaultCalls() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var n int64
	for _, op := range vaultOps {
		n += s.calls[op]
	}
	return n
}

// ResetCalls sets every counter to zero.
func (s *Server) ResetCalls() {
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.calls)
}

// LastPrincipal is the identity of the last authorized vault request:
// App(clientID), SystemIdentity or ManagedIdentity(clientID).
func (s *Server) LastPrincipal() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastSeen
}
