package kvtest

import "strings"

// Permission is a key permission of a Key Vault access policy.
type Permission string

// Key permissions.
const (
	PermGet       Permission = "get"
	PermList      Permission = "list"
	PermWrapKey   Permission = "wrapKey"
	PermUnwrapKey Permission = "unwrapKey"
	PermEncrypt   Permission = "encrypt"
	PermDecrypt   Permission = "decrypt"
	PermCreate    Permission = "create"
	PermRotate    Permission = "rotate"
	PermUpdate    Permission = "update"
)

// AllPermissions is what a principal without SetPermissions may do.
func AllPermissions() []Permission {
	return []Permission{PermGet, PermList, PermWrapKey, PermUnwrapKey, PermEncrypt, PermDecrypt, PermCreate, PermRotate, PermUpdate}
}

// rbacAction is the Azure RBAC data action of each permission.
var rbacAction = map[Permission]string{
	PermGet: "keys/read", PermList: "keys/read",
	PermWrapKey: "keys/wrap/action", PermUnwrapKey: "keys/unwrap/action",
	PermEncrypt: "keys/encrypt/action", PermDecrypt: "keys/decrypt/action",
	PermCreate: "keys/create/action", PermRotate: "keys/rotate/action", PermUpdate: "keys/update/action",
}

// SetPermissions replaces what principal (App, SystemIdentity,
// ManagedIdentity) may do. Principals never set have AllPermissions.
func (s *Server) SetPermissions(principal string, perms ...Permission) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := map[Permission]bool{}
	for _, p := range perms {
		m[p] = true
	}
	s.perms[principal] = m
}

// SetKeyPermissions replaces what principal may do with key name only, as
// a role assignment scoped to one key does; it overrides SetPermissions
// for that key.
func (s *Server) SetKeyPermissions(principal, name string, perms ...Permission) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := map[Permission]bool{}
	for _, p := range perms {
		m[p] = true
	}
	if s.keyPerms[principal] == nil {
		s.keyPerms[principal] = map[string]map[Permission]bool{}
	}
	s.keyPerms[principal][strings.ToLower(name)] = m
}
