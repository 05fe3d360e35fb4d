package nbd

import (
	"bufio"
	"context"
	"sync"
	"testing"
	"time"

	"snapmount/test/testenv"
)

// FuzzClientReplies feeds arbitrary bytes to a client connection as the
// server's side of the transmission phase while three requests are in
// flight (cookies 1, 2, 3: a READ into one buffer, a READ into two, a
// BLOCK_STATUS). Whatever arrives, the client must not panic, must not
// hang, and must end every request with data or an error.
func FuzzClientReplies(f *testing.F) {
	ok := func(b ...[]byte) []byte {
		var all []byte
		for _, x := range b {
			all = append(all, x...)
		}
		return all
	}
	ch := func(flags uint16, typ ChunkType, cookie uint64, p []byte) []byte {
		return append(AppendChunkHeader(nil, flags, typ, cookie, uint32(len(p))), p...)
	}
	f.Add(ok(
		ch(ReplyFlagDone, ChunkOffsetData, 1, dataChunk(0, make([]byte, 4096))),
		ch(0, ChunkOffsetHole, 2, holeChunk(8192, 256)),
		ch(ReplyFlagDone, ChunkOffsetData, 2, dataChunk(8192+256, make([]byte, 256))),
		ch(ReplyFlagDone, ChunkBlockStatus, 3, AppendBlockStatusPayload(nil, 7, []WireExtent{{4096, 0}, {1 << 20, 3}})),
	), true)
	f.Add(ok(
		append(AppendSimpleReply(nil, 0, 1), make([]byte, 4096)...),
		AppendSimpleReply(nil, 5, 2),
	), false)
	f.Add(ok(ch(ReplyFlagDone, ChunkErrorOffset, 1, AppendErrorChunkPayload(nil, EIO, "x", 100))), true)
	f.Add(ok(ch(ReplyFlagDone, ChunkOffsetData, 1, dataChunk(0, make([]byte, 5000)))), true)
	f.Add([]byte{0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff}, true)

	f.Fuzz(func(t *testing.T, data []byte, structured bool) {
		cc, sc := testenv.SocketPair(t)
		info := &ExportInfo{
			Size: 1 << 20, Flags: FlagHasFlags | FlagReadOnly,
			BlockSize:  BlockSize{Min: 1, Preferred: 4096, Max: 1 << 20},
			Structured: structured,
			Contexts:   map[uint32]string{7: ContextBaseAllocation},
		}
		c := newConn(cc, bufio.NewReader(cc), info, nil)
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()

		// Register the requests in cookie order so the seeds line up,
		// then wait for all three at once.
		calls := []*call{}
		for _, r := range []struct {
			typ    Cmd
			off    uint64
			length uint32
			dst    scatter
		}{
			{CmdRead, 0, 4096, scatter{make([]byte, 4096)}},
			{CmdRead, 8192, 512, scatter{make([]byte, 100), make([]byte, 412)}},
			{CmdBlockStatus, 0, 65536, nil},
		} {
			cl, err := c.start(ctx, time.Time{}, r.typ, 0, r.off, r.length, r.dst)
			if err != nil {
				t.Fatal(err)
			}
			calls = append(calls, cl)
		}
		var wg sync.WaitGroup
		for _, cl := range calls {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_ = c.wait(ctx, cl)
			}()
		}

		// The server drains requests (so writes never block), sends
		// the fuzz bytes, and hangs up.
		go func() {
			buf := make([]byte, 4096)
			for {
				if _, err := sc.Read(buf); err != nil {
					return
				}
			}
		}()
		_, _ = sc.Write(data)
		sc.Close()
		testenv.Wait(t, &wg, "the client's requests to end")
		if ctx.Err() != nil {
			t.Fatal("requests did not end after the server hung up")
		}
	})
}
