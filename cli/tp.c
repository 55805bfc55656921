/*
 * tp.c - `--tp N` for the commands that run a model: before anything else
 * the command joins (or starts) its tensor-parallel group; a rank other
 * than 0 only loads its shard and follows rank 0 to the end, so the rest
 * of a command's code runs on rank 0 alone (kiln.h, "Tensor parallel").
 */
#include <stdio.h>
#include <string.h>

#include "cli.h"

bool cli_tp_begin(run_opts *o, const char *cmd, int *rc)
{
    *rc = 0;
    if (o->tp > 1) {
        /* refuse a model whose heads do not divide before any rank starts */
        kiln_status st = kiln_model_check_tp(o->model, o->tp);
        if (st != KILN_OK) {
            cli_report(cmd, st);
            *rc = 1;
            return true;
        }
    }
    kiln_tp_params p;
    kiln_tp_params_default(&p);
    p.n_ranks = o->tp;
    p.device = o->device;
    p.argc = cli_argc;
    p.argv = cli_argv;
    p.timeout_sec = o->tp_timeout;
    p.comm_always = o->tp_comm;
    kiln_tp_role role;
    int code = 0;
    kiln_status st = kiln_tp_init(&p, &role, &code);
    if (st != KILN_OK) {
        cli_report(cmd, st);
        *rc = st == KILN_ERR_INVALID_ARG ? 2 : 1;
        return true;
    }
    switch (role) {
    case KILN_TP_LAUNCHER:
        *rc = code;
        return true;
    case KILN_TP_FOLLOWER: {
        double load_sec;
        o->quiet_load = true;
        kiln_model *m = cli_load_model(o, &load_sec);
        code = 1;
        if (m && (st = kiln_tp_follow(m, &code)) != KILN_OK) {
            kiln_tp_info ti;
            kiln_tp_get_info(&ti);
            char what[64];
            snprintf(what, sizeof what, "%s (rank %d of %d)", cmd, ti.rank, ti.size);
            cli_report(what, st);
        }
        kiln_model_free(m);
        kiln_tp_finalize(code);
        *rc = m && st == KILN_OK ? code : 1;
        return true;
    }
    case KILN_TP_NONE:
    case KILN_TP_LEADER:
        break;
    }
    return false;
}

void cli_tp_end(int rc) { kiln_tp_finalize(rc); }
