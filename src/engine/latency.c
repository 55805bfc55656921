/*
 * latency.c - latency histograms for the engine's TTFT and inter-token
 * figures (kiln_engine_get_latency): bucket i holds values in
 * [2^(i/8), 2^((i+1)/8)) microseconds, so memory is constant however many
 * tokens are measured and a percentile is within one bucket (~9 %).
 */
#include <math.h>

#include "engine/engine.h"

void lat_add(lat_hist *h, double sec)
{
    double x = sec > LAT_MIN_SEC ? sec / LAT_MIN_SEC : 1.0;
    int b = (int)(log2(x) * LAT_BUCKETS_PER_OCTAVE);
    if (b < 0)
        b = 0;
    if (b >= LAT_N_BUCKETS)
        b = LAT_N_BUCKETS - 1;
    h->count[b]++;
    h->n++;
}

void lat_merge(lat_hist *dst, const lat_hist *src)
{
    for (int i = 0; i < LAT_N_BUCKETS; i++)
        dst->count[i] += src->count[i];
    dst->n += src->n;
}

double lat_quantile(const lat_hist *h, double q)
{
    if (h->n == 0)
        return 0.0;
    /* the rank'th smallest value, 1-based, then its bucket's geometric middle */
    uint64_t rank = (uint64_t)ceil(q * (double)h->n);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (int i = 0; i < LAT_N_BUCKETS; i++) {
        seen += h->count[i];
        if (seen >= rank)
            return LAT_MIN_SEC * exp2(((double)i + 0.5) / LAT_BUCKETS_PER_OCTAVE);
    }
    return LAT_MIN_SEC * exp2((double)LAT_OCTAVES);
}
