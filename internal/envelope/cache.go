package envelope

import (
	"container/list"
	"crypto/cipher"
	"sync"
	"time"
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
	// unwrapped is when the entry's key was unwrapped (or made): after the
	// cache TTL it is unwrapped again, so the store's word on the version
	// is asked at least that often.
	unwrapped time.Time
}

func newKEKCache(capacity int) *kekCache {
	return &kekCache{capacity: capacity, order: list.New(), entries: make(map[[32]byte]*list.Element)}
}

// get returns the entry for ref unless it is missing or older than ttl
// (then it is dropped).
func (c *kekCache) get(ref [32]byte, now time.Time, ttl time.Duration) (*cacheEntry, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.entries[ref]
	if !ok {
		return nil, false
	}
	e := el.Value.(*cacheEntry)
	if now.Sub(e.unwrapped) >= ttl {
		c.order.Remove(el)
		delete(c.entries, ref)
		return nil, false
	}
	c.order.MoveToFront(el)
	return e, true
}

// versions returns the distinct remote versions of the cached entries.
func (c *kekCache) versions() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	seen := make(map[string]bool)
	var out []string
	for el := c.order.Front(); el != nil; el = el.Next() {
		if v := el.Value.(*cacheEntry).remoteVersion; !seen[v] {
			seen[v] = true
			out = append(out, v)
		}
	}
	return out
}

// clear drops every entry and returns how many it dropped.
func (c *kekCache) clear() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.order.Len()
	c.order.Init()
	clear(c.entries)
	return n
}

// evict drops every entry whose remote version is in versions and returns
// how many it dropped.
func (c *kekCache) evict(versions []string) int {
	drop := make(map[string]bool, len(versions))
	for _, v := range versions {
		drop[v] = true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for el := c.order.Front(); el != nil; {
		next := el.Next()
		if e := el.Value.(*cacheEntry); drop[e.remoteVersion] {
			c.order.Remove(el)
			delete(c.entries, e.ref)
			n++
		}
		el = next
	}
	return n
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
