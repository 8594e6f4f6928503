package adminauth

import (
	"crypto/tls"
	"fmt"
	"os"
	"sync"

	"go.uber.org/zap"
)

// stamp identifies one version of a file: a change of file (rename over
// it, a Kubernetes Secret update), size or modification time makes a new
// stamp.
type stamp struct {
	fi os.FileInfo
}

func statStamp(path string) (stamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return stamp{}, err
	}
	return stamp{fi}, nil
}

func (s stamp) equal(o stamp) bool {
	if s.fi == nil || o.fi == nil {
		return false
	}
	return os.SameFile(s.fi, o.fi) && s.fi.Size() == o.fi.Size() &&
		s.fi.ModTime().Equal(o.fi.ModTime()) && s.fi.Mode() == o.fi.Mode()
}

// keyPairFile is a certificate and key pair read from two PEM files and
// re-read on the first use after either file changed. While a changed pair
// fails to load (a renewal that has written the certificate but not yet
// the key), the last pair that loaded stays in service; the failure is
// logged once per change.
type keyPairFile struct {
	certFile, keyFile string
	log               *zap.Logger

	mu        sync.Mutex
	tried     [2]stamp         // the stamps of the last load attempt
	cert      *tls.Certificate // the last pair that loaded, or nil
	lastError error            // the last attempt's error, or nil
}

// loadKeyPairFile reads the pair once and returns an error if it does not
// load, so that a wrong path fails at start.
func loadKeyPairFile(certFile, keyFile string, log *zap.Logger) (*keyPairFile, error) {
	if log == nil {
		log = zap.NewNop()
	}
	kp := &keyPairFile{certFile: certFile, keyFile: keyFile, log: log}
	if _, err := kp.get(); err != nil {
		return nil, err
	}
	return kp, nil
}

// get returns the current pair.
func (kp *keyPairFile) get() (*tls.Certificate, error) {
	cs, cerr := statStamp(kp.certFile)
	ks, kerr := statStamp(kp.keyFile)
	kp.mu.Lock()
	defer kp.mu.Unlock()
	if cerr != nil || kerr != nil {
		err := fmt.Errorf("adminauth: key pair %s, %s: %w", kp.certFile, kp.keyFile, firstErr(cerr, kerr))
		if kp.cert == nil {
			return nil, err
		}
		return kp.cert, nil // between the removal of a file and its replacement
	}
	if kp.tried[0].equal(cs) && kp.tried[1].equal(ks) {
		if kp.cert == nil {
			return nil, kp.lastError
		}
		return kp.cert, nil
	}
	kp.tried = [2]stamp{cs, ks}
	c, err := tls.LoadX509KeyPair(kp.certFile, kp.keyFile)
	if err != nil {
		kp.lastError = fmt.Errorf("adminauth: load key pair %s, %s: %w", kp.certFile, kp.keyFile, err)
		if kp.cert == nil {
			return nil, kp.lastError
		}
		kp.log.Warn("changed certificate files do not load; the previous certificate stays in service",
			zap.String("certFile", kp.certFile), zap.String("keyFile", kp.keyFile), zap.Error(err))
		return kp.cert, nil
	}
	if kp.cert != nil {
		kp.log.Info("certificate reloaded", zap.String("certFile", kp.certFile),
			zap.Time("notAfter", c.Leaf.NotAfter), zap.String("serial", c.Leaf.SerialNumber.Text(16)))
	}
	kp.cert, kp.lastError = &c, nil
	return kp.cert, nil
}

func firstErr(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}
