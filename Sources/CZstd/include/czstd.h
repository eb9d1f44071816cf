// CZstd: the system's libzstd for Swift. Glue only: zstd does every byte of compression and
// decompression. What Swift cannot import from <zstd.h> (the ZSTD_CONTENTSIZE_* macros, the
// error codes behind ZSTD_isError) is wrapped here once; `.ci/run` installs libzstd-dev.
#ifndef CZSTD_H
#define CZSTD_H

#include <stddef.h>
#include <zstd.h>

/// The content size a zstd frame declares in its header: -1 if `source` is not the start of a
/// zstd frame (or is too short to tell), -2 if the frame does not declare its size, else the size.
long long czstd_frame_content_size(const void *source, size_t source_length);

/// A decompression context that refuses frames whose window exceeds 2^window_log_max bytes:
/// what a frame may make zstd hold in memory is bounded before it is read. NULL if out of memory.
ZSTD_DCtx *czstd_dctx_new(int window_log_max);

/// A compression context at `level` (1 fast, negative faster still). NULL if out of memory.
ZSTD_CCtx *czstd_cctx_new(int level);

#endif
