package install

// EncryptedResources returns the resources of an EncryptionConfiguration
// (the file's content) whose writes the kms provider named providerName
// encrypts: those of every entry where it is the first provider. Patterns
// such as "*.apps" are returned as they are.
func EncryptedResources(data []byte, providerName string) ([]string, error) {
	ec, err := parseEncryptionConfig(data)
	if err != nil {
		return nil, err
	}
	return ec.writesWithOurs(providerName), nil
}

// ProtectedResources returns the resources of an EncryptionConfiguration
// (the file's content) whose objects the kms provider named providerName
// may have stored: those of every entry that holds it, first or not (after
// uninstall's first stage it is no longer first). Patterns are returned as
// they are.
func ProtectedResources(data []byte, providerName string) ([]string, error) {
	ec, err := parseEncryptionConfig(data)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ec.entriesWithOurs(providerName) {
		out = append(out, resourcesOf(e)...)
	}
	return out, nil
}
