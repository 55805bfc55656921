/*
 * load.c - bind a model's tensors to the architecture's weight slots and
 * place them in the backend's memory.
 *
 * Every tensor the descriptor calls for is looked up by its GGUF name
 * (Hugging Face names are translated), checked for presence, shape and a
 * type kiln can compute on.  Norm weights and biases are small and are
 * converted to F32 (adding 1 where Hugging Face Gemma stores w - 1) on the
 * host.  Then, by backend:
 *
 *  - host memory (CPU): matrices are used straight from the read-only
 *    mapping, so loading copies nothing;
 *  - a device with asynchronous transfers (CUDA): binding only records a
 *    job per tensor (where its bytes are, its type in the file and on the
 *    device); then one device allocation (the arena) takes every tensor at
 *    LD_DEVICE_ALIGN offsets in binding order, which is the order the
 *    forward pass reads them, and the load pipeline (src/load) fills it;
 *  - otherwise, or when asked (ld_model_opts.sync, the tests' reference):
 *    one allocation and one blocking upload per tensor.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>

#include "format/gguf.h"
#include "format/safetensors.h"
#include "load/load.h"
#include "model/model.h"

/* A tensor as found in either format. */
typedef struct found_tensor {
    const char *name; /* as in the file */
    uint32_t type;
    uint32_t n_dims;
    uint64_t ne[4];
    const void *data;
    uint64_t nbytes;
    int file;        /* index of its file in the source (shard), -1: no file */
    uint64_t offset; /* of data in that file */
} found_tensor;

/* Allocations the model owns (converted vectors, uploaded weights), freed
 * together by model_weights_free. */
typedef struct owned_item {
    void *p;
    bool device; /* backend memory (else kiln_malloc'd host memory) */
} owned_item;

typedef struct owned_list {
    owned_item *items;
    size_t n, cap;
} owned_list;

/* Where the device address of a deferred tensor goes once the arena
 * exists, and host bytes to free once it has been loaded. */
typedef struct deferred {
    kb_weight *w;   /* its data, or NULL */
    float **f;      /* or this */
    void *host;     /* converted on the host (kiln_free), or NULL */
} deferred;

typedef struct load_ctx {
    model *m;
    const model_source *src;
    owned_list *owned;
    const ld_model_opts *o;
    kiln_progress_fn progress;
    void *user;
    ld_monitor *mon;
    uint64_t bytes_done, bytes_total;
    /* device pipeline: tensors become jobs, placed together at the end */
    bool defer;
    ld_job *jobs;        /* (n_jobs) in binding order */
    deferred *dfr;       /* (n_jobs) */
    size_t n_jobs, cap_jobs;
    ld_file *files;      /* (n_files) the source's files */
    int n_files;
    kb_weight rope_w;    /* GGUF rope_freqs, bound like any vector */
} load_ctx;

/* ------------------------------------------------------------------------
 * Names: GGUF is the canonical spelling; HF names are derived from it.
 * ---------------------------------------------------------------------- */

typedef struct name_map {
    const char *gguf;  /* suffix after "blk.N." or a global name */
    const char *hf;    /* matching HF suffix after "model.layers.N." */
} name_map;

static const name_map global_names[] = {
    {"token_embd.weight", "model.embed_tokens.weight"},
    {"output_norm.weight", "model.norm.weight"},
    {"output.weight", "lm_head.weight"},
};

static const name_map layer_names[] = {
    {"attn_norm.weight", "input_layernorm.weight"},
    {"attn_q.weight", "self_attn.q_proj.weight"},
    {"attn_k.weight", "self_attn.k_proj.weight"},
    {"attn_v.weight", "self_attn.v_proj.weight"},
    {"attn_q.bias", "self_attn.q_proj.bias"},
    {"attn_k.bias", "self_attn.k_proj.bias"},
    {"attn_v.bias", "self_attn.v_proj.bias"},
    {"attn_q_norm.weight", "self_attn.q_norm.weight"},
    {"attn_k_norm.weight", "self_attn.k_norm.weight"},
    {"attn_output.weight", "self_attn.o_proj.weight"},
    {"ffn_gate.weight", "mlp.gate_proj.weight"},
    {"ffn_up.weight", "mlp.up_proj.weight"},
    {"ffn_down.weight", "mlp.down_proj.weight"},
    /* pre-FFN norm: llama/qwen call it post_attention_layernorm, gemma3
     * pre_feedforward_layernorm (and uses post_attention_layernorm for its
     * sandwich norm); see hf_layer_name. */
    {"ffn_norm.weight", "post_attention_layernorm.weight"},
    {"post_attention_norm.weight", "post_attention_layernorm.weight"},
    {"post_ffw_norm.weight", "post_feedforward_layernorm.weight"},
};

static const char *hf_layer_name(model_arch arch, const char *gguf_suffix)
{
    if (arch == ARCH_GEMMA3 && !strcmp(gguf_suffix, "ffn_norm.weight"))
        return "pre_feedforward_layernorm.weight";
    for (size_t i = 0; i < sizeof layer_names / sizeof layer_names[0]; i++)
        if (!strcmp(layer_names[i].gguf, gguf_suffix))
            return layer_names[i].hf;
    return NULL;
}

/* Look a tensor up by its GGUF name; name_buf receives the name as the file
 * spells it (also when the tensor is missing, for the message). */
static bool find_tensor(const load_ctx *c, int layer, const char *suffix, found_tensor *out,
                        char *name_buf, size_t name_cap)
{
    if (layer >= 0)
        snprintf(name_buf, name_cap, "blk.%d.%s", layer, suffix);
    else
        snprintf(name_buf, name_cap, "%s", suffix);
    if (c->src->gguf) {
        const gguf_file *g = c->src->gguf;
        const gguf_tensor *t = gguf_find_tensor(g, name_buf);
        if (!t)
            return false;
        *out = (found_tensor){t->name, t->type, t->n_dims, {t->ne[0], t->ne[1], t->ne[2], t->ne[3]},
                              t->data, t->nbytes, -1, 0};
        if (g->map.data) {
            out->file = 0;
            out->offset = (uint64_t)(t->data - g->base);
        }
        return true;
    }
    char hf_name[256];
    if (layer >= 0) {
        const char *hs = hf_layer_name(c->m->hp.arch, suffix);
        if (!hs)
            return false;
        snprintf(hf_name, sizeof hf_name, "model.layers.%d.%s", layer, hs);
    } else {
        const char *hs = NULL;
        for (size_t i = 0; i < sizeof global_names / sizeof global_names[0]; i++)
            if (!strcmp(global_names[i].gguf, suffix))
                hs = global_names[i].hf;
        if (!hs)
            return false;
        snprintf(hf_name, sizeof hf_name, "%s", hs);
    }
    snprintf(name_buf, name_cap, "%s", hf_name);
    const hf_model *hf = c->src->hf;
    const st_tensor *t = hf_find_tensor(hf, hf_name);
    if (!t)
        return false;
    *out = (found_tensor){t->name, t->type, t->n_dims, {t->ne[0], t->ne[1], t->ne[2], t->ne[3]},
                          t->data, t->nbytes, -1, 0};
    int shard = (int)(kiln_strmap_get(&hf->index, hf_name, strlen(hf_name)) >> 32);
    if (shard >= 0 && (uint32_t)shard < hf->n_shards && hf->shards[shard]->map.data) {
        out->file = shard;
        out->offset = (uint64_t)(t->data - hf->shards[shard]->base);
    }
    return true;
}

/* ------------------------------------------------------------------------
 * Placement, one tensor at a time (host memory; the synchronous path)
 * ---------------------------------------------------------------------- */

/* Record an allocation for model_weights_free; on failure the caller still
 * owns p. */
static kiln_status own(load_ctx *c, void *p, bool device)
{
    owned_list *o = c->owned;
    if (o->n == o->cap) {
        size_t nc = o->cap ? o->cap * 2 : 64;
        owned_item *ni = kiln_realloc(o->items, nc * sizeof *ni);
        if (!ni)
            return KILN_FAIL(KILN_ERR_NOMEM, "out of memory binding weights");
        o->items = ni;
        o->cap = nc;
    }
    o->items[o->n++] = (owned_item){p, device};
    return KILN_OK;
}

/* A tensor bound in place (no pipeline): count it. */
static void report_progress(load_ctx *c, uint64_t bytes)
{
    c->bytes_done += bytes;
    atomic_store(&c->mon->bytes_done, c->bytes_done);
    atomic_fetch_add(&c->mon->tensors_done, 1);
    if (c->progress)
        c->progress(c->bytes_done, c->bytes_total, c->user);
}

/* Put n bytes of host data in the backend's memory, or use them in place
 * when the backend computes on host memory. */
static kiln_status place(load_ctx *c, const void *host, uint64_t n, const char *what,
                         const void **dev)
{
    kb_backend *be = c->m->be;
    if (be->host_memory) {
        *dev = host;
        return KILN_OK;
    }
    void *d = be->ops->alloc(be, n, what);
    if (!d)
        return KILN_ERR_NOMEM;
    kiln_status st = be->ops->upload(be, d, host, n);
    if (st != KILN_OK) {
        be->ops->free(be, d);
        return st;
    }
    *dev = d;
    st = own(c, d, true);
    if (st != KILN_OK)
        be->ops->free(be, d);
    return st;
}

/* Place a matrix in a type the backend asked for instead of its file type
 * (F32 -> BF16 for CUDA), a bounded slab of rows at a time. */
static kiln_status place_converted(load_ctx *c, kb_weight *w, const found_tensor *t,
                                   const char *fname)
{
    kb_backend *be = c->m->be;
    const quant_traits *from = quant_get_traits(t->type);
    const quant_traits *to = quant_get_traits(w->type);
    uint64_t in_row, out_row;
    kiln_status st;
    if ((st = quant_row_size(t->type, (uint64_t)w->ne[0], &in_row, fname)) ||
        (st = quant_row_size(w->type, (uint64_t)w->ne[0], &out_row, fname)))
        return st;
    if (!to->quantize)
        return KILN_FAIL(KILN_ERR_INTERNAL, "tensor %s: no conversion to %s", fname, to->name);
    uint64_t total = out_row * (uint64_t)w->ne[1];
    void *d = be->ops->alloc(be, total, fname);
    if (!d)
        return KILN_ERR_NOMEM;
    if ((st = own(c, d, true))) {
        be->ops->free(be, d);
        return st;
    }
    int64_t slab = (int64_t)((16u << 20) / (out_row + (uint64_t)w->ne[0] * sizeof(float)));
    if (slab < 1)
        slab = 1;
    float *f = kiln_malloc_array((size_t)w->ne[0], sizeof(float));
    uint8_t *buf = kiln_malloc_array((size_t)slab, (size_t)out_row);
    uint8_t *row = kiln_malloc((size_t)in_row);
    if (!f || !buf || !row) {
        kiln_free(f);
        kiln_free(buf);
        kiln_free(row);
        return KILN_FAIL(KILN_ERR_NOMEM, "tensor %s: out of memory converting to %s", fname,
                         to->name);
    }
    for (int64_t r0 = 0; r0 < w->ne[1] && st == KILN_OK; r0 += slab) {
        int64_t n = w->ne[1] - r0 < slab ? w->ne[1] - r0 : slab;
        for (int64_t r = 0; r < n; r++) {
            /* a copy first: the row kernels read whole elements, and a
             * safetensors tensor may start at any byte */
            memcpy(row, (const uint8_t *)t->data + (uint64_t)(r0 + r) * in_row, in_row);
            from->dequantize(row, f, w->ne[0]);
            to->quantize(f, buf + (uint64_t)r * out_row, w->ne[0]);
        }
        st = be->ops->upload(be, (uint8_t *)d + (uint64_t)r0 * out_row, buf,
                             (size_t)((uint64_t)n * out_row));
    }
    kiln_free(f);
    kiln_free(buf);
    kiln_free(row);
    w->row_bytes = out_row;
    w->data = d;
    return st;
}

/* ------------------------------------------------------------------------
 * Deferred placement: jobs for the load pipeline
 * ---------------------------------------------------------------------- */

/* Record a job; its device address goes to target->data or *f later.  On
 * failure host (if any) is freed. */
static kiln_status defer_job(load_ctx *c, const ld_job *j, kb_weight *w, float **f, void *host)
{
    if (c->n_jobs == c->cap_jobs) {
        size_t nc = c->cap_jobs ? c->cap_jobs * 2 : 256;
        ld_job *nj = kiln_realloc(c->jobs, nc * sizeof *nj);
        if (nj)
            c->jobs = nj;
        deferred *nd = nj ? kiln_realloc(c->dfr, nc * sizeof *nd) : NULL;
        if (!nd) {
            kiln_free(host);
            return KILN_FAIL(KILN_ERR_NOMEM, "out of memory binding weights");
        }
        c->dfr = nd;
        c->cap_jobs = nc;
    }
    c->jobs[c->n_jobs] = *j;
    c->dfr[c->n_jobs++] = (deferred){w, f, host};
    return KILN_OK;
}

/* A job for a tensor as stored in the file (or for host bytes when the
 * source has no file behind it). */
static ld_job file_job(const found_tensor *t, kiln_type as, int64_t n_in, uint64_t dst_bytes)
{
    return (ld_job){.name = t->name, .file = t->file, .offset = t->offset,
                    .host = t->file < 0 ? t->data : NULL, .src_bytes = t->nbytes,
                    .src_type = (kiln_type)t->type, .dst_type = as, .row_elems = n_in,
                    .dst_bytes = dst_bytes};
}

/* A job for host bytes (converted vectors), which the job list then owns. */
static kiln_status defer_host(load_ctx *c, const char *name, void *host, uint64_t n,
                              kb_weight *w, float **f)
{
    ld_job j = {.name = name, .file = -1, .host = host, .src_bytes = n,
                .src_type = KILN_TYPE_F32, .dst_type = KILN_TYPE_F32,
                .row_elems = (int64_t)(n / sizeof(float)), .dst_bytes = n};
    return defer_job(c, &j, w, f, host);
}

/* The files of the source, as the pipeline reads them. */
static kiln_status collect_files(load_ctx *c)
{
    const model_source *src = c->src;
    int n = src->gguf ? 1 : (int)src->hf->n_shards;
    c->files = kiln_calloc((size_t)(n ? n : 1), sizeof *c->files);
    if (!c->files)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory binding weights");
    c->n_files = n;
    if (src->gguf) {
        c->files[0] = (ld_file){src->gguf->path, src->gguf->base, src->gguf->size};
    } else {
        for (int i = 0; i < n; i++) {
            const st_file *f = src->hf->shards[i];
            c->files[i] = (ld_file){f->path, f->base, f->size};
        }
    }
    return KILN_OK;
}

/* The arena could not be had: say which tensor is the first beyond the
 * device's free memory. */
static kiln_status arena_failed(load_ctx *c, const uint64_t *offs, uint64_t total)
{
    char why[KILN_ERROR_MAX], a[32], b[32];
    snprintf(why, sizeof why, "%s", kiln_last_error());
    kb_backend *be = c->m->be;
    size_t fr = 0, tot = 0;
    if (be->ops->mem_info && be->ops->mem_info(be, &fr, &tot) == KILN_OK) {
        for (size_t i = 0; i < c->n_jobs; i++) {
            if (offs[i] + c->jobs[i].dst_bytes > fr)
                return KILN_FAIL(KILN_ERR_NOMEM,
                                 "%s; the weights need %s in %zu tensors, and tensor %s is the "
                                 "first beyond the %s free", why,
                                 kiln_fmt_bytes(total, a, sizeof a), c->n_jobs, c->jobs[i].name,
                                 kiln_fmt_bytes(fr, b, sizeof b));
        }
    }
    return KILN_FAIL(KILN_ERR_NOMEM, "%s (the weights need %s in %zu tensors)", why,
                     kiln_fmt_bytes(total, a, sizeof a), c->n_jobs);
}

/* Give every job its place in one device allocation and run the pipeline. */
static kiln_status place_deferred(load_ctx *c)
{
    kb_backend *be = c->m->be;
    if (c->n_jobs == 0)
        return KILN_OK;
    uint64_t *offs = kiln_malloc_array(c->n_jobs, sizeof *offs);
    if (!offs)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory placing weights");
    uint64_t total = 0;
    for (size_t i = 0; i < c->n_jobs; i++) {
        uint64_t at = (total + LD_DEVICE_ALIGN - 1) / LD_DEVICE_ALIGN * LD_DEVICE_ALIGN;
        if (at < total || !ck_add_u64(at, c->jobs[i].dst_bytes, &total)) {
            kiln_free(offs);
            return KILN_FAIL(KILN_ERR_RANGE, "tensor %s: the weights overflow 64 bits",
                             c->jobs[i].name);
        }
        offs[i] = at;
    }
    uint8_t *arena = total <= SIZE_MAX ? be->ops->alloc(be, (size_t)total, "model weights")
                                       : NULL;
    kiln_status st;
    if (!arena) {
        st = arena_failed(c, offs, total);
        kiln_free(offs);
        return st;
    }
    if ((st = own(c, arena, true))) {
        be->ops->free(be, arena);
        kiln_free(offs);
        return st;
    }
    for (size_t i = 0; i < c->n_jobs; i++) {
        c->jobs[i].dst = arena + offs[i];
        if (c->dfr[i].w)
            c->dfr[i].w->data = arena + offs[i];
        if (c->dfr[i].f)
            *c->dfr[i].f = (float *)(arena + offs[i]);
    }
    kiln_free(offs);
    ld_params p = c->o->pipe;
    p.mon = c->mon;
    p.progress = c->progress;
    p.progress_user = c->user;
    return ld_run(be, c->files, c->n_files, c->jobs, c->n_jobs, &p, c->o->stats);
}

/* ------------------------------------------------------------------------
 * Binding
 * ---------------------------------------------------------------------- */

/* This rank's rows or columns of a matrix t (of n_in columns, row_bytes a
 * row) as a tensor of its own: a row range is a window of the same bytes;
 * a column range becomes rows of row_bytes_out placed `pitch` apart in the
 * source (pitch 0: contiguous), which the caller gathers.  *n_in_out and
 * *rows_out are the slice's shape. */
static kiln_status slice_tensor(const found_tensor *t, const model_slice *sl, int64_t n_in,
                                int64_t rows, uint64_t row_bytes, found_tensor *out,
                                int64_t *n_in_out, int64_t *rows_out, uint64_t *pitch,
                                int n_ranks)
{
    *out = *t;
    *n_in_out = n_in;
    *rows_out = rows;
    *pitch = 0;
    if (sl->kind == MODEL_SLICE_ROWS) {
        uint64_t off = (uint64_t)sl->begin * row_bytes;
        out->data = (const uint8_t *)t->data + off;
        out->offset = t->offset + off;
        out->nbytes = (uint64_t)sl->count * row_bytes;
        out->ne[1] = (uint64_t)sl->count;
        *rows_out = sl->count;
    } else if (sl->kind == MODEL_SLICE_COLS) {
        kiln_status st = model_shard_check_tensor(t->name, (kiln_type)t->type, sl, n_ranks);
        uint64_t skip, take;
        if (st || (st = quant_row_size(t->type, (uint64_t)sl->begin, &skip, t->name)) ||
            (st = quant_row_size(t->type, (uint64_t)sl->count, &take, t->name)))
            return st;
        out->data = (const uint8_t *)t->data + skip;
        out->offset = t->offset + skip;
        out->nbytes = take * (uint64_t)rows;
        out->ne[0] = (uint64_t)sl->count;
        *n_in_out = sl->count;
        *pitch = row_bytes;
    }
    return KILN_OK;
}

/* Copy a column slice (rows of `take` bytes, `pitch` apart from `src`, a
 * file mapping when `mapped`) into new host memory; NULL when out of
 * memory. */
static void *gather_columns(const void *src, uint64_t pitch, uint64_t take, int64_t rows,
                            bool mapped)
{
    uint8_t *buf = kiln_aligned_alloc(64, (size_t)(take * (uint64_t)rows) + 1);
    if (!buf)
        return NULL;
    for (int64_t r = 0; r < rows; r++)
        memcpy(buf + (uint64_t)r * take, (const uint8_t *)src + (uint64_t)r * pitch, take);
    /* the other ranks' columns were read with ours: not this rank's memory */
    if (mapped)
        kiln_map_drop(src, (size_t)(pitch * (uint64_t)rows));
    return buf;
}

/* Bind one tensor, or the part of it this rank holds (role; the shape
 * checked is the whole tensor's).  rows == 0 means a vector of n_in
 * elements. */
static kiln_status bind(load_ctx *c, kb_weight *w, int layer, const char *suffix, int64_t n_in,
                        int64_t rows, bool required, float add_to_vector, model_weight_role role)
{
    char name[256];
    found_tensor t;
    memset(w, 0, sizeof *w);
    if (!find_tensor(c, layer, suffix, &t, name, sizeof name)) {
        if (!required)
            return KILN_OK;
        return KILN_FAIL(KILN_ERR_FORMAT, "%s: missing tensor %s",
                         c->src->hf ? c->src->hf->dir : c->src->gguf->path, name);
    }
    const char *fname = t.name;
    if (atomic_load(&c->mon->cancel))
        return KILN_FAIL(KILN_ERR_CANCELLED, "loading cancelled at tensor %s", fname);
    bool is_vec = rows == 0;
    uint64_t want1 = is_vec ? 1 : (uint64_t)rows;
    uint64_t got1 = t.n_dims >= 2 ? t.ne[1] : 1;
    bool dims_ok = t.ne[0] == (uint64_t)n_in && got1 == want1 && t.ne[2] == 1 && t.ne[3] == 1;
    if (!dims_ok) {
        if (is_vec)
            return KILN_FAIL(KILN_ERR_FORMAT,
                             "tensor %s: shape mismatch: expected [%lld], found [%llu, %llu]",
                             fname, (long long)n_in, (unsigned long long)t.ne[0],
                             (unsigned long long)got1);
        return KILN_FAIL(KILN_ERR_FORMAT,
                         "tensor %s: shape mismatch: expected [%lld, %lld] (in, out), found "
                         "[%llu, %llu]",
                         fname, (long long)n_in, (long long)rows, (unsigned long long)t.ne[0],
                         (unsigned long long)got1);
    }
    kiln_status st = quant_check_supported(t.type, fname);
    if (st != KILN_OK)
        return st;
    const quant_traits *tr = quant_get_traits(t.type);
    model_slice sl = model_shard_slice(&c->m->shard, &c->m->hp, role);
    int64_t vec_skip = 0;
    uint64_t row_bytes, pitch = 0;
    if ((st = quant_row_size(t.type, (uint64_t)n_in, &row_bytes, fname)))
        return st;
    if (is_vec && sl.kind != MODEL_SLICE_NONE) {
        /* a bias: the elements of this rank's rows, cut after conversion */
        vec_skip = sl.begin;
    } else if (!is_vec && sl.kind != MODEL_SLICE_NONE) {
        found_tensor whole = t;
        int64_t r_in = 0;
        if ((st = slice_tensor(&whole, &sl, n_in, rows, row_bytes, &t, &n_in, &r_in, &pitch,
                               c->m->shard.n_ranks)))
            return st;
        want1 = (uint64_t)r_in;
        if ((st = quant_row_size(t.type, (uint64_t)n_in, &row_bytes, fname)))
            return st;
    }
    w->name = fname;
    w->ne[0] = is_vec && sl.kind != MODEL_SLICE_NONE ? sl.count : n_in;
    w->ne[1] = (int64_t)want1;
    w->row_bytes = row_bytes;
    if (is_vec) {
        /* Vectors become F32 (the norm and bias ops read F32). */
        float *v = kiln_aligned_alloc(64, (size_t)n_in * sizeof(float));
        if (!v)
            return KILN_FAIL(KILN_ERR_NOMEM, "tensor %s: out of memory", fname);
        if ((uintptr_t)t.data % 4 == 0) {
            tr->dequantize(t.data, v, n_in);
        } else {
            /* an odd safetensors offset: the row kernels read whole elements */
            void *tmp = kiln_malloc((size_t)t.nbytes);
            if (!tmp) {
                kiln_free(v);
                return KILN_FAIL(KILN_ERR_NOMEM, "tensor %s: out of memory", fname);
            }
            memcpy(tmp, t.data, t.nbytes);
            tr->dequantize(tmp, v, n_in);
            kiln_free(tmp);
        }
        for (int64_t i = 0; i < n_in; i++)
            v[i] += add_to_vector;
        if (vec_skip || w->ne[0] != n_in)
            memmove(v, v + vec_skip, (size_t)w->ne[0] * sizeof(float));
        w->type = KILN_TYPE_F32;
        w->row_bytes = (uint64_t)w->ne[0] * sizeof(float);
        if (c->defer) {
            if ((st = defer_host(c, fname, v, w->row_bytes, w, NULL)))
                return st;
            return KILN_OK; /* counted by the pipeline */
        }
        if (c->m->be->host_memory) {
            if ((st = own(c, v, false)) != KILN_OK) {
                kiln_free(v);
                return st;
            }
            w->data = v;
        } else {
            st = place(c, v, w->row_bytes, fname, &w->data);
            kiln_free(v);
            if (st)
                return st;
        }
    } else {
        kb_backend *be = c->m->be;
        kiln_type as = be->ops->weight_type ? be->ops->weight_type(be, t.type) : t.type;
        if (as == KILN_TYPE_COUNT) {
            char tn[16];
            return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                             "tensor %s: type %s has no kernels in the %s backend", fname,
                             quant_type_name(t.type, tn, sizeof tn), be->ops->name);
        }
        w->type = as;
        if (c->defer) {
            uint64_t out_row = row_bytes;
            if (as != (kiln_type)t.type &&
                (st = quant_row_size(as, (uint64_t)n_in, &out_row, fname)))
                return st;
            w->row_bytes = out_row;
            ld_job j = file_job(&t, as, n_in, out_row * want1);
            if (pitch) {
                j.row_pitch = pitch;
                j.row_take = row_bytes;
            }
            return defer_job(c, &j, w, NULL, NULL);
        }
        /* a column slice is gathered first: on the host the rank keeps its
         * own copy, a device gets it uploaded like a whole tensor */
        void *cols = NULL;
        if (pitch) {
            if (!(cols = gather_columns(t.data, pitch, row_bytes, (int64_t)want1, t.file >= 0)))
                return KILN_FAIL(KILN_ERR_NOMEM, "tensor %s: out of memory for this rank's "
                                 "columns", fname);
            t.data = cols;
        }
        if (pitch && be->host_memory && as == (kiln_type)t.type) {
            if ((st = own(c, cols, false))) {
                kiln_free(cols);
                return st;
            }
            w->data = cols;
            cols = NULL;
        } else if (as == (kiln_type)t.type) {
            st = place(c, t.data, t.nbytes, fname, &w->data);
        } else {
            st = place_converted(c, w, &t, fname);
        }
        kiln_free(cols);
        if (st)
            return st;
    }
    report_progress(c, t.nbytes);
    return KILN_OK;
}

/* Llama 3 frequency divisors: from the GGUF rope_freqs tensor, or computed
 * from an HF rope_scaling of type "llama3". */
static kiln_status bind_rope_freqs(load_ctx *c)
{
    model *m = c->m;
    model_hparams *hp = &m->hp;
    int n = hp->rope.n_dims / 2;
    if (c->src->gguf)
        return bind(c, &c->rope_w, -1, "rope_freqs.weight", n, 0, false, 0.0f, MODEL_W_WHOLE);
    json_t *rs = model_hf_rope_params(c->src->hf);
    json_t *jt = rs ? json_object_get(rs, "rope_type") : NULL;
    if (!json_is_string(jt) || strcmp(json_string_value(jt), "llama3"))
        return KILN_OK;
    double factor = json_number_value(json_object_get(rs, "factor"));
    double lo = json_number_value(json_object_get(rs, "low_freq_factor"));
    double hi = json_number_value(json_object_get(rs, "high_freq_factor"));
    double old_ctx = json_number_value(json_object_get(rs, "original_max_position_embeddings"));
    if (!(factor > 0) || !(lo > 0) || !(hi > lo) || !(old_ctx > 0))
        return KILN_FAIL(KILN_ERR_FORMAT,
                         "%s/config.json: llama3 rope_scaling needs factor, low_freq_factor < "
                         "high_freq_factor and original_max_position_embeddings",
                         c->src->hf->dir);
    float *f = kiln_aligned_alloc(64, (size_t)n * sizeof(float));
    if (!f)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory for rope frequencies");
    double lo_wl = old_ctx / lo, hi_wl = old_ctx / hi;
    for (int i = 0; i < n; i++) {
        double freq = pow((double)hp->rope.theta, -2.0 * i / hp->rope.n_dims);
        double wl = 2 * M_PI / freq;
        double div;
        if (wl < hi_wl)
            div = 1.0;
        else if (wl > lo_wl)
            div = factor;
        else {
            double smooth = (old_ctx / wl - lo) / (hi - lo);
            div = 1.0 / ((1 - smooth) / factor + smooth);
        }
        f[i] = (float)div;
    }
    kiln_status st;
    if (c->defer)
        return defer_host(c, "rope_freqs", f, (uint64_t)n * sizeof(float), NULL,
                          &m->rope_freqs);
    if (c->m->be->host_memory) {
        if ((st = own(c, f, false)) != KILN_OK) {
            kiln_free(f);
            return st;
        }
        m->rope_freqs = f;
    } else {
        const void *dev;
        st = place(c, f, (uint64_t)n * sizeof(float), "rope_freqs", &dev);
        kiln_free(f);
        if (st)
            return st;
        m->rope_freqs = (float *)dev;
    }
    return KILN_OK;
}

/* Which layers use the sliding window. */
static void mark_swa_layers(load_ctx *c)
{
    model *m = c->m;
    const model_hparams *hp = &m->hp;
    json_t *lt = c->src->hf ? json_object_get((json_t *)c->src->hf->config, "layer_types") : NULL;
    for (int il = 0; il < hp->n_layer; il++) {
        bool swa = false;
        if (hp->sliding_window > 0) {
            if (json_is_array(lt) && (size_t)il < json_array_size(lt)) {
                const char *s = json_string_value(json_array_get(lt, (size_t)il));
                swa = s && !strcmp(s, "sliding_attention");
            } else if (hp->swa_pattern > 0) {
                swa = (il + 1) % hp->swa_pattern != 0;
            }
        }
        m->layers[il].is_swa = swa;
    }
}

static uint64_t source_bytes(const model_source *src, uint32_t *n_tensors)
{
    uint64_t total = 0;
    if (src->gguf) {
        *n_tensors = (uint32_t)src->gguf->n_tensors;
        for (uint64_t i = 0; i < src->gguf->n_tensors; i++)
            total += src->gguf->tensors[i].nbytes;
    } else {
        *n_tensors = (uint32_t)src->hf->n_tensors;
        for (uint64_t i = 0; i < src->hf->n_tensors; i++)
            total += hf_tensor_at(src->hf, i)->nbytes;
    }
    return total;
}

/* Every tensor of the architecture, in the order the forward pass reads
 * them: embeddings, each layer, output. */
static kiln_status bind_all(load_ctx *c)
{
    model *m = c->m;
    /* shapes are the whole model's; each rank binds its part (roles) */
    model_hparams whole = m->hp;
    if (m->shard.n_ranks > 1) {
        whole.n_head = m->shard.n_head;
        whole.n_head_kv = m->shard.n_head_kv;
        whole.n_ff = m->shard.n_ff;
    }
    const model_hparams *hp = &whole;
    float norm_add = hp->norm_plus_one ? 1.0f : 0.0f;
    int64_t E = hp->n_embd, V = hp->n_vocab, F = hp->n_ff;
    int64_t QD = (int64_t)hp->n_head * hp->head_dim;
    int64_t KD = (int64_t)hp->n_head_kv * hp->head_dim;
    int64_t VD = (int64_t)hp->n_head_kv * hp->head_dim_v;
    int64_t OD = (int64_t)hp->n_head * hp->head_dim_v;
    const model_weight_role W0 = MODEL_W_WHOLE;
    kiln_status st;

    if ((st = bind(c, &m->tok_embd, -1, "token_embd.weight", E, V, true, 0, MODEL_W_WHOLE)))
        return st;
    for (int il = 0; il < hp->n_layer; il++) {
        model_layer *L = &m->layers[il];
        if ((st = bind(c, &L->attn_norm, il, "attn_norm.weight", E, 0, true, norm_add, W0)) ||
            (st = bind(c, &L->wq, il, "attn_q.weight", E, QD, true, 0, MODEL_W_Q)) ||
            (st = bind(c, &L->wk, il, "attn_k.weight", E, KD, true, 0, MODEL_W_K)) ||
            (st = bind(c, &L->wv, il, "attn_v.weight", E, VD, true, 0, MODEL_W_V)) ||
            (st = bind(c, &L->wo, il, "attn_output.weight", OD, E, true, 0, MODEL_W_O)) ||
            (st = bind(c, &L->ffn_norm, il, "ffn_norm.weight", E, 0, true, norm_add, W0)) ||
            (st = bind(c, &L->w_gate, il, "ffn_gate.weight", E, F, true, 0, MODEL_W_GATE_UP)) ||
            (st = bind(c, &L->w_up, il, "ffn_up.weight", E, F, true, 0, MODEL_W_GATE_UP)) ||
            (st = bind(c, &L->w_down, il, "ffn_down.weight", F, E, true, 0, MODEL_W_DOWN)))
            return st;
        /* Biases: required by qwen2, accepted wherever present. */
        if ((st = bind(c, &L->bq, il, "attn_q.bias", QD, 0, hp->qkv_bias, 0, MODEL_W_Q)) ||
            (st = bind(c, &L->bk, il, "attn_k.bias", KD, 0, hp->qkv_bias, 0, MODEL_W_K)) ||
            (st = bind(c, &L->bv, il, "attn_v.bias", VD, 0, hp->qkv_bias, 0, MODEL_W_V)))
            return st;
        if (hp->qk_norm &&
            ((st = bind(c, &L->q_norm, il, "attn_q_norm.weight", hp->head_dim, 0, true,
                        norm_add, W0)) ||
             (st = bind(c, &L->k_norm, il, "attn_k_norm.weight", hp->head_dim, 0, true,
                        norm_add, W0))))
            return st;
        if (hp->sandwich_norm &&
            ((st = bind(c, &L->post_attn_norm, il, "post_attention_norm.weight", E, 0, true,
                        norm_add, W0)) ||
             (st = bind(c, &L->post_ffn_norm, il, "post_ffw_norm.weight", E, 0, true,
                        norm_add, W0))))
            return st;
    }
    if ((st = bind(c, &m->output_norm, -1, "output_norm.weight", E, 0, true, norm_add, W0)))
        return st;
    if (!hp->tied_output &&
        (st = bind(c, &m->output, -1, "output.weight", E, V, true, 0, MODEL_W_OUTPUT)))
        return st;
    return bind_rope_freqs(c);
}

kiln_status model_shard_check_source(const model_source *src, const model_hparams *hp,
                                     int n_ranks)
{
    model m = {.hp = *hp};
    load_ctx c = {.m = &m, .src = src};
    model_shard sh;
    kiln_status st;
    for (int r = 0; r < n_ranks; r++) {
        if ((st = model_shard_plan(hp, n_ranks, r, &sh)))
            return st;
        model_hparams mine = *hp;
        model_shard_apply(&sh, &mine);
        const model_slice cut[2] = {model_shard_slice(&sh, &mine, MODEL_W_O),
                                    model_shard_slice(&sh, &mine, MODEL_W_DOWN)};
        static const char *const names[2] = {"attn_output.weight", "ffn_down.weight"};
        for (int il = 0; il < hp->n_layer; il++) {
            for (int k = 0; k < 2; k++) {
                found_tensor t;
                char name[256];
                if (find_tensor(&c, il, names[k], &t, name, sizeof name) &&
                    (st = model_shard_check_tensor(t.name, (kiln_type)t.type, &cut[k],
                                                   n_ranks)))
                    return st;
            }
        }
    }
    return KILN_OK;
}

void model_load_opts_from(const kiln_model_params *p, ld_model_opts *o)
{
    memset(o, 0, sizeof *o);
    ld_params_default(&o->pipe);
    if (!p)
        return;
    o->pipe.n_streams = p->load_streams;
    o->pipe.n_threads = p->load_threads;
    o->pipe.ring_bytes = p->load_ring_bytes;
    o->pipe.io = (kiln_load_io)p->load_io;
    o->pipe.check = p->load_check != 0;
    o->pipe.progress = p->progress;
    o->pipe.progress_user = p->progress_user;
}

kiln_status model_weights_load_ex(model *m, const model_source *src, const ld_model_opts *o)
{
    const model_hparams *hp = &m->hp;
    ld_model_opts defaults;
    if (!o) {
        model_load_opts_from(NULL, &defaults);
        o = &defaults;
    }
    owned_list *owned = kiln_calloc(1, sizeof *owned);
    if (!owned)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory binding weights");
    m->owned = owned;
    m->layers = kiln_calloc((size_t)hp->n_layer, sizeof *m->layers);
    if (!m->layers)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory binding weights");
    ld_monitor own_mon = {0};
    uint32_t n_src = 0;
    load_ctx c = {.m = m, .src = src, .owned = owned, .o = o, .progress = o->pipe.progress,
                  .user = o->pipe.progress_user, .mon = o->pipe.mon ? o->pipe.mon : &own_mon,
                  .bytes_total = source_bytes(src, &n_src)};
    c.defer = !m->be->host_memory && !o->sync && kb_has_async(m->be);
    if (!c.defer) {
        atomic_store(&c.mon->bytes_total, c.bytes_total);
        atomic_store(&c.mon->tensors_total, n_src);
    }
    kiln_status st = c.defer ? collect_files(&c) : KILN_OK;
    if (st == KILN_OK)
        st = bind_all(&c);
    if (st == KILN_OK && c.defer)
        st = place_deferred(&c);
    for (size_t i = 0; i < c.n_jobs; i++)
        kiln_free(c.dfr[i].host);
    kiln_free(c.jobs);
    kiln_free(c.dfr);
    kiln_free(c.files);
    if (st)
        return st;
    if (hp->tied_output) {
        m->output = m->tok_embd;
        if (m->shard.n_ranks > 1) {
            /* this rank's vocabulary rows of the embedding, in place */
            m->output.ne[1] = m->shard.vocab_rows;
            m->output.data = (const uint8_t *)m->tok_embd.data +
                             (uint64_t)m->shard.vocab_begin * m->tok_embd.row_bytes;
        }
    }
    if (kb_weight_present(&c.rope_w))
        m->rope_freqs = (float *)c.rope_w.data;
    m->hp.rope.freq_factors = m->rope_freqs;
    mark_swa_layers(&c);
    if (!c.defer) {
        atomic_store(&c.mon->tensors_total, atomic_load(&c.mon->tensors_done));
        atomic_store(&c.mon->bytes_done, c.bytes_total);
        if (c.progress)
            c.progress(c.bytes_total, c.bytes_total, c.user);
    }
    return KILN_OK;
}

kiln_status model_weights_load(model *m, const model_source *src, kiln_progress_fn progress,
                               void *user)
{
    ld_model_opts o;
    model_load_opts_from(NULL, &o);
    o.pipe.progress = progress;
    o.pipe.progress_user = user;
    return model_weights_load_ex(m, src, &o);
}

void model_weights_free(model *m)
{
    owned_list *o = m->owned;
    if (o) {
        for (size_t i = 0; i < o->n; i++) {
            if (o->items[i].device)
                m->be->ops->free(m->be, o->items[i].p);
            else
                kiln_free(o->items[i].p);
        }
        kiln_free(o->items);
        kiln_free(o);
    }
    m->owned = NULL;
    kiln_free(m->layers);
    m->layers = NULL;
}
