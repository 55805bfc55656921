/*
 * common.c - small file and string helpers the eval files share: mkdir -p,
 * whole-file writes through a temporary and a rename (a reader never sees
 * half a summary), file-name-safe names, printf into a new string, and a
 * bounded append to a growing text.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "eval/eval.h"
#include "util/util.h"

bool eval_text_append(kiln_text *t, const char *s, size_t n, size_t max)
{
    size_t need;
    if (!ck_add(t->len, n, &need) || !ck_add(need, 1, &need) || need > max)
        return false;
    if (need > t->cap) {
        size_t cap = need < 256 ? 256 : need;
        if (cap < max / 2)
            cap = cap * 2 > max ? max : cap * 2;
        char *p = kiln_realloc(t->data, cap);
        if (!p)
            return false;
        t->data = p;
        t->cap = cap;
    }
    memcpy(t->data + t->len, s, n);
    t->len += n;
    t->data[t->len] = '\0';
    return true;
}

char *eval_strfmt(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return NULL;
    char *s = kiln_malloc((size_t)n + 1);
    if (!s)
        return NULL;
    va_start(ap, fmt);
    vsnprintf(s, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return s;
}

kiln_status eval_mkdirs(const char *path)
{
    char *p = kiln_strdup(path);
    if (!p)
        return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", path);
    for (char *s = p + 1;; s++) {
        bool end = *s == '\0';
        if (*s != '/' && !end)
            continue;
        *s = '\0';
        if (mkdir(p, 0755) != 0 && errno != EEXIST) {
            kiln_status st = KILN_FAIL(KILN_ERR_IO, "mkdir %s: %s", p, strerror(errno));
            kiln_free(p);
            return st;
        }
        if (end)
            break;
        *s = '/';
    }
    kiln_free(p);
    return KILN_OK;
}

kiln_status eval_write_atomic(const char *path, const char *data, size_t len)
{
    char *tmp = eval_strfmt("%s.tmp.%d", path, (int)getpid());
    if (!tmp)
        return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", path);
    kiln_status st = KILN_OK;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        st = KILN_FAIL(KILN_ERR_IO, "%s: %s", tmp, strerror(errno));
        kiln_free(tmp);
        return st;
    }
    size_t done = 0;
    while (done < len) {
        ssize_t w = write(fd, data + done, len - done);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            st = KILN_FAIL(KILN_ERR_IO, "%s: %s", tmp, strerror(errno));
            break;
        }
        done += (size_t)w;
    }
    if (st == KILN_OK && fsync(fd) != 0)
        st = KILN_FAIL(KILN_ERR_IO, "%s: %s", tmp, strerror(errno));
    close(fd);
    if (st == KILN_OK && rename(tmp, path) != 0)
        st = KILN_FAIL(KILN_ERR_IO, "rename %s: %s", path, strerror(errno));
    if (st != KILN_OK)
        unlink(tmp);
    kiln_free(tmp);
    return st;
}

char *eval_safe_name(const char *name)
{
    char *s = kiln_strdup(name);
    if (!s)
        return NULL;
    for (char *p = s; *p; p++) {
        unsigned char c = (unsigned char)*p;
        if (!(c >= 'a' && c <= 'z') && !(c >= 'A' && c <= 'Z') && !(c >= '0' && c <= '9') &&
            c != '-' && c != '_' && c != '.')
            *p = '_';
    }
    if (s[0] == '.')
        s[0] = '_';
    return s;
}
