/*
 * generate.c - the smallest complete use of libkiln: load a model, render a
 * chat prompt, generate a reply greedily and print it as it streams.
 *
 *   build/examples/generate models/SmolLM2-135M-Instruct.Q4_1.gguf "Hello!"
 */
#include <stdio.h>
#include <string.h>

#include "kiln.h"

static void print_token(const kiln_token_event *ev, void *user)
{
    (void)user;
    fwrite(ev->text, 1, ev->text_len, stdout);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL MESSAGE\n", argv[0]);
        return 2;
    }
    kiln_model *model = NULL;
    kiln_engine *engine = NULL;
    kiln_text prompt = {0};
    kiln_tokens tokens = {0};
    kiln_status st;

    if ((st = kiln_model_load(argv[1], NULL, &model)) != KILN_OK)
        goto fail;

    /* The model's chat template turns messages into the prompt text. */
    kiln_chat_message msg = {"user", argv[2]};
    kiln_chat_params cp;
    kiln_chat_params_default(&cp);
    cp.add_generation_prompt = 1;
    const kiln_tokenizer *tok = kiln_model_tokenizer(model);
    if ((st = kiln_chat_render(tok, &msg, 1, &cp, &prompt)) != KILN_OK ||
        (st = kiln_tokenizer_encode(tok, prompt.data, prompt.len, KILN_ENCODE_PARSE_SPECIAL,
                                    &tokens)) != KILN_OK)
        goto fail;

    kiln_engine_params ep;
    kiln_engine_params_default(&ep);
    ep.n_ctx = 1024;
    ep.max_seqs = 1;
    if ((st = kiln_engine_create(model, &ep, &engine)) != KILN_OK)
        goto fail;

    kiln_sampling s;
    kiln_sampling_default(&s);
    s.temperature = 0; /* greedy */
    s.max_tokens = 128;
    uint64_t id;
    if ((st = kiln_engine_submit(engine, tokens.ids, tokens.n, &s, print_token, NULL, &id)) ||
        (st = kiln_engine_run(engine)))
        goto fail;
    putchar('\n');
    kiln_engine_free(engine);
    kiln_tokens_free(&tokens);
    kiln_text_free(&prompt);
    kiln_model_free(model);
    return 0;
fail:
    fprintf(stderr, "error: %s\n", kiln_last_error());
    kiln_engine_free(engine);
    kiln_tokens_free(&tokens);
    kiln_text_free(&prompt);
    kiln_model_free(model);
    return 1;
}
