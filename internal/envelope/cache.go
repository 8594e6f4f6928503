package envelope

import (
	"container/list"
	"crypto/cipher"
	"sync"
)

// kekCache is a bounded LRU of unwrapped local KEKs, keyed by the SHA-256 of
// their lkek annotation. It holds only AEAD instances, never raw key bytes.
type kekCache struct {
	mu       sync.Mutex
	capacity int
	order    *list.List // front = most recently used; values are *cacheEntry
	entries  map[[32]byte]*list.Element
}

// cacheEntry is one unwrapped local KEK.
type cacheEntry struct {
	ref           [32]byte
	aead          cipher.AEAD
	remoteVersion string
	keyID         string
}

func newKEKCache(capacity int) *kekCache {
	return &kekCache{capacity: capacity, order: list.New(), entries: make(map[[32]byte]*list.Element)}
}

func (c *kekCache) get(ref [32]byte) (*cacheEntry, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.entries[ref]
	if !ok {
		return nil, false
	}
	c.order.MoveToFront(el)
	return el.Value.(*cacheEntry), true
}

func (c *kekCache) add(e *cacheEntry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.entries[e.ref]; ok {
		el.Value = e
		c.order.MoveToFront(el)
		return
	}
	c.entries[e.ref] = c.order.PushFront(e)
	for c.order.Len() > c.capacity {
		last := c.order.Back()
		c.order.Remove(last)
		delete(c.entries, last.Value.(*cacheEntry).ref)
	}
}

func (c *kekCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.order.Len()
}

// flights coalesces concurrent unwraps of the same local KEK into one remote
// call.
type flights struct {
	mu       sync.Mutex
	inflight map[[32]byte]*flight
}

type flight struct {
	done  chan struct{}
	entry *cacheEntry
	err   error
}

// start returns the flight for ref and whether the caller leads it (and so
// must call finish).
func (f *flights) start(ref [32]byte) (*flight, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if fl, ok := f.inflight[ref]; ok {
		return fl, false
	}
	if f.inflight == nil {
		f.inflight = make(map[[32]byte]*flight)
	}
	fl := &flight{done: make(chan struct{})}
	f.inflight[ref] = fl
	return fl, true
}

func (f *flights) finish(ref [32]byte, fl *flight, e *cacheEntry, err error) {
	f.mu.Lock()
	delete(f.inflight, ref)
	f.mu.Unlock()
	fl.entry, fl.err = e, err
	close(fl.done)
}
