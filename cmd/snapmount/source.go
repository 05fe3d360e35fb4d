package main

import (
	"context"
	"io"

	"snapmount/cache"
	"snapmount/nbd"
)

// nbdSource adapts the NBD client to what the cache looks for on its
// source: context-aware and vectored reads (merged misses land straight in
// block buffers). Only cmd wires the packages together, so the adapters
// live here.
type nbdSource struct{ c *nbd.Client }

func (s nbdSource) ReadAt(p []byte, off int64) (int, error) { return s.c.ReadAt(p, off) }

func (s nbdSource) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	return s.c.ReadAtContext(ctx, p, off)
}

func (s nbdSource) ReadVecContext(ctx context.Context, bufs [][]byte, off int64) error {
	return s.c.ReadVecContext(ctx, bufs, off)
}

// allocSource adds the allocation map, for servers that negotiated
// base:allocation: the cache then serves holes as zeros without a
// transfer, lseek SEEK_DATA/SEEK_HOLE work, and st_blocks counts what
// the server stores.
type allocSource struct{ nbdSource }

func (s allocSource) Allocation(ctx context.Context, off, length int64) ([]cache.Extent, error) {
	ext, err := s.c.BlockStatus(ctx, off, length)
	if err != nil {
		return nil, err
	}
	out := make([]cache.Extent, len(ext))
	for i, e := range ext {
		out[i] = cache.Extent{Offset: e.Offset, Length: e.Length, Zero: e.Zero(), Hole: e.Hole()}
	}
	return out, nil
}

// cacheSource picks the adapter matching what the server offers.
func cacheSource(c *nbd.Client) io.ReaderAt {
	if _, ok := c.Info().ContextID(nbd.ContextBaseAllocation); ok {
		return allocSource{nbdSource{c}}
	}
	return nbdSource{c}
}
