package server

// Payload buffers: one sync.Pool per power-of-two size class from 4 KiB to
// MaxPayload, so READ and WRITE payloads go straight between the socket
// and pread/pwrite without an allocation per request.

import (
	"math/bits"
	"sync"

	"snapmount/nbd"
)

const (
	minClassShift = 12 // 4 KiB
	maxClassShift = 25 // 32 MiB = MaxPayload
)

var bufPools [maxClassShift - minClassShift + 1]sync.Pool

func sizeClass(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// getBuf returns a buffer of length n (at most MaxPayload) whose
// contents are undefined.
func getBuf(n int) []byte {
	if n > nbd.MaxPayload {
		panic("nbd: buffer request above MaxPayload")
	}
	c := sizeClass(n)
	if p, ok := bufPools[c].Get().(*[]byte); ok {
		return (*p)[:n]
	}
	return make([]byte, n, 1<<(c+minClassShift))
}

// putBuf returns a buffer from getBuf to its pool. The caller must
// not use it afterwards.
func putBuf(b []byte) {
	c := cap(b)
	if c < 1<<minClassShift || c&(c-1) != 0 || c > nbd.MaxPayload {
		panic("nbd: putBuf of a buffer not from getBuf")
	}
	b = b[:c]
	bufPools[bits.Len(uint(c))-1-minClassShift].Put(&b)
}
