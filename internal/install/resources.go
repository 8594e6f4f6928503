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
