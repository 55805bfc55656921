/*
 * misc.c - half-precision conversion, the clock, short file reads and a
 * process's /proc stat, byte formatting and the progress bar.
 */
#include <math.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#include "util/util.h"

/* ------------------------------------------------------------------------
 * IEEE binary16 <-> binary32, exact in both directions (round to nearest
 * even on the way down), written without F16C so results match everywhere.
 * ---------------------------------------------------------------------- */

float kiln_fp16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do {
                man <<= 1;
                e++;
            } while (!(man & 0x400u));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    return kiln_fp32_from_bits(u);
}

uint16_t kiln_f32_to_fp16(float f)
{
    uint32_t u = kiln_fp32_to_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) /* NaN */
        return (uint16_t)(sign | 0x7e00u);
    if (abs >= 0x477ff000u) /* rounds to >= 65520: infinity */
        return (uint16_t)(sign | 0x7c00u);
    if (abs < 0x38800000u) { /* below the smallest normal half */
        /* scale so that the half subnormal lsb is 1.0 and round */
        float a = kiln_fp32_from_bits(abs) * 16777216.0f; /* 2^24 */
        uint32_t m = (uint32_t)lrintf(a);
        return (uint16_t)(sign | m);
    }
    uint32_t exp = (abs >> 23) - 127 + 15;
    uint32_t man = abs & 0x7fffffu;
    uint32_t h = (exp << 10) | (man >> 13);
    uint32_t rest = man & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u)))
        h++;
    return (uint16_t)(sign | h);
}

double kiln_now_sec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void kiln_sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

long kiln_read_prefix(const char *path, char *buf, size_t cap)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, cap - 1, f);
    fclose(f);
    buf[n] = '\0';
    return (long)n;
}

bool kiln_proc_read_stat(long pid, kiln_proc_stat *out)
{
    char path[64], line[1024];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    if (kiln_read_prefix(path, line, sizeof line) < 0)
        return false;
    /* "pid (comm) S ppid pgrp ...": comm may hold spaces and parens, so the
     * fields start after the last ')'; starttime is the 19th after S */
    const char *p = strrchr(line, ')');
    if (!p || sscanf(p + 1, " %c %ld %ld", &out->state, &out->ppid, &out->pgrp) != 3)
        return false;
    p += 2;
    for (int field = 0; field < 19 && p; field++)
        p = strchr(p + 1, ' ');
    return p && sscanf(p, " %llu", &out->start) == 1;
}

const char *kiln_fmt_bytes(uint64_t bytes, char *buf, size_t n)
{
    static const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)bytes;
    int u = 0;
    while (v >= 1024.0 && u < 4) {
        v /= 1024.0;
        u++;
    }
    if (u == 0)
        snprintf(buf, n, "%llu B", (unsigned long long)bytes);
    else
        snprintf(buf, n, "%.1f %s", v, units[u]);
    return buf;
}

/* ------------------------------------------------------------------------
 * Progress bar
 * ---------------------------------------------------------------------- */

void kiln_progress_init(kiln_progress *p, const char *label, uint64_t total,
                        bool is_bytes, int fd)
{
    p->label = label;
    p->total = total;
    p->is_bytes = is_bytes;
    p->fd = fd;
    p->tty = isatty(fd);
    p->t_start = kiln_now_sec();
    p->t_last = 0;
    p->last_decile = -1;
    p->note[0] = '\0';
}

void kiln_progress_note(kiln_progress *p, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->note, sizeof p->note, fmt, ap);
    va_end(ap);
}

static void progress_draw(kiln_progress *p, uint64_t done, bool final)
{
    double now = kiln_now_sec();
    double el = now - p->t_start;
    double frac = p->total ? (double)done / (double)p->total : 1.0;
    if (frac > 1.0)
        frac = 1.0;
    /* a rate over a few milliseconds means nothing; show it once it settles */
    double rate = el >= 0.05 ? (double)done / el : 0.0;
    double eta = (rate > 0 && done < p->total) ? (double)(p->total - done) / rate : 0.0;
    char rate_s[48];
    if (rate == 0.0)
        snprintf(rate_s, sizeof rate_s, "-");
    else if (p->is_bytes)
        snprintf(rate_s, sizeof rate_s, "%.2f GB/s", rate / 1e9);
    else
        snprintf(rate_s, sizeof rate_s, "%.0f/s", rate);
    char line[256];
    if (p->tty) {
        enum { W = 30 };
        char bar[W + 1];
        int fill = (int)(frac * W);
        for (int i = 0; i < W; i++)
            bar[i] = i < fill ? '#' : '.';
        bar[W] = '\0';
        int n = snprintf(line, sizeof line, "\r%s [%s] %3d%%  %s%s%s  ETA %.1fs%s",
                         p->label, bar, (int)(frac * 100), rate_s, p->note[0] ? "  " : "",
                         p->note, eta, final ? "\n" : "");
        if (write(p->fd, line, (size_t)n) < 0)
            return;
    } else {
        int dec = (int)(frac * 10);
        if (dec == p->last_decile && !final)
            return;
        if (final && dec == p->last_decile && dec == 10)
            return;
        p->last_decile = dec;
        int n = snprintf(line, sizeof line, "%s: %3d%%  %s%s%s  %.2fs\n", p->label,
                         (int)(frac * 100), rate_s, p->note[0] ? "  " : "", p->note, el);
        if (write(p->fd, line, (size_t)n) < 0)
            return;
    }
}

void kiln_progress_update(kiln_progress *p, uint64_t done)
{
    double now = kiln_now_sec();
    if (p->tty && now - p->t_last < 0.05)
        return;
    p->t_last = now;
    progress_draw(p, done, false);
}

void kiln_progress_finish(kiln_progress *p) { progress_draw(p, p->total, true); }

double kiln_time_now(void)
{
    return kiln_now_sec();
}
