/*
 * file.c - read-only mapping of model files and whole reads of small ones.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/util.h"

kiln_status kiln_map_file(const char *path, kiln_map *m)
{
    m->data = NULL;
    m->size = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return KILN_FAIL(KILN_ERR_IO, "%s: cannot open: %s", path,
                         strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return KILN_FAIL(KILN_ERR_IO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return KILN_FAIL(KILN_ERR_IO, "%s: not a regular file", path);
    }
    if (st.st_size == 0) {
        close(fd);
        return KILN_OK;
    }
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (p == MAP_FAILED)
        return KILN_FAIL(KILN_ERR_IO, "%s: cannot map %lld bytes: %s", path,
                         (long long)st.st_size, strerror(e));
    m->data = p;
    m->size = (size_t)st.st_size;
    return KILN_OK;
}

void kiln_unmap(kiln_map *m)
{
    if (m->data)
        munmap((void *)m->data, m->size);
    m->data = NULL;
    m->size = 0;
}

void kiln_map_drop(const void *p, size_t n)
{
    const uintptr_t page = 4096;
    uintptr_t a = ((uintptr_t)p + page - 1) / page * page, e = ((uintptr_t)p + n) / page * page;
    if (e > a)
        madvise((void *)a, e - a, MADV_DONTNEED);
}

kiln_status kiln_read_file(const char *path, size_t max_size, char **out,
                           size_t *out_len)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return KILN_FAIL(KILN_ERR_IO, "%s: cannot open: %s", path,
                         strerror(errno));
    size_t cap = 4096, len = 0;
    char *buf = kiln_malloc(cap);
    if (!buf) {
        fclose(f);
        return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", path);
    }
    for (;;) {
        if (len + 1 >= cap) {
            if (cap > max_size) {
                kiln_free(buf);
                fclose(f);
                return KILN_FAIL(KILN_ERR_RANGE,
                                 "%s: larger than the limit of %zu bytes", path,
                                 max_size);
            }
            char *nb = kiln_realloc(buf, cap * 2);
            if (!nb) {
                kiln_free(buf);
                fclose(f);
                return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", path);
            }
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + len, 1, cap - 1 - len, f);
        len += got;
        if (got == 0)
            break;
    }
    int err = ferror(f);
    fclose(f);
    if (err) {
        kiln_free(buf);
        return KILN_FAIL(KILN_ERR_IO, "%s: read error", path);
    }
    if (len > max_size) {
        kiln_free(buf);
        return KILN_FAIL(KILN_ERR_RANGE,
                         "%s: larger than the limit of %zu bytes", path,
                         max_size);
    }
    buf[len] = '\0';
    *out = buf;
    if (out_len)
        *out_len = len;
    return KILN_OK;
}
