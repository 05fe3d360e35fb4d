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
	srvMinClassShift = 12 // 4 KiB
	srvMaxClassShift = 25 // 32 MiB = MaxPayload
)

var srvBufPools [srvMaxClassShift - srvMinClassShift + 1]sync.Pool

func srvClass(n int) int {
	if n <= 1<<srvMinClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - srvMinClassShift
}

// srvGetBuf returns a buffer of length n (at most MaxPayload) whose
// contents are undefined.
func srvGetBuf(n int) []byte {
	if n > nbd.MaxPayload {
		panic("nbd: buffer request above MaxPayload")
	}
	c := srvClass(n)
	if p, ok := srvBufPools[c].Get().(*[]byte); ok {
		return (*p)[:n]
	}
	return make([]byte, n, 1<<(c+srvMinClassShift))
}

// srvPutBuf returns a buffer from srvGetBuf to its pool. The caller must
// not use it afterwards.
func srvPutBuf(b []byte) {
	c := cap(b)
	if c < 1<<srvMinClassShift || c&(c-1) != 0 || c > nbd.MaxPayload {
		panic("nbd: srvPutBuf of a buffer not from srvGetBuf")
	}
	b = b[:c]
	srvBufPools[bits.Len(uint(c))-1-srvMinClassShift].Put(&b)
}
