#include "czstd.h"

long long czstd_frame_content_size(const void *source, size_t source_length) {
    unsigned long long size = ZSTD_getFrameContentSize(source, source_length);
    if (size == ZSTD_CONTENTSIZE_ERROR) return -1;
    if (size == ZSTD_CONTENTSIZE_UNKNOWN) return -2;
    if (size > (unsigned long long)0x7fffffffffffffffLL) return -1;
    return (long long)size;
}

ZSTD_DCtx *czstd_dctx_new(int window_log_max) {
    ZSTD_DCtx *context = ZSTD_createDCtx();
    if (context == NULL) return NULL;
    if (ZSTD_isError(ZSTD_DCtx_setParameter(context, ZSTD_d_windowLogMax, window_log_max))) {
        ZSTD_freeDCtx(context);
        return NULL;
    }
    return context;
}

ZSTD_CCtx *czstd_cctx_new(int level) {
    ZSTD_CCtx *context = ZSTD_createCCtx();
    if (context == NULL) return NULL;
    // The frame says how many bytes it holds (the receiver checks that against its batch) and
    // carries no checksum: the connection (TCP, or TLS's AEAD) already guards the bytes, and
    // --verify digests the pages themselves.
    if (ZSTD_isError(ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, level)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(context, ZSTD_c_contentSizeFlag, 1)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(context, ZSTD_c_checksumFlag, 0))) {
        ZSTD_freeCCtx(context);
        return NULL;
    }
    return context;
}
