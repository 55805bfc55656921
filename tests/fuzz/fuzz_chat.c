/*
 * fuzz_chat.c - libFuzzer target for chat-template detection and rendering.
 *
 * The input is read two ways.  Whole, it is a template text for
 * tok_chat_detect (which must accept it or refuse it with a message, and
 * whose default-system-prompt extraction walks arbitrary bytes).  Cut at NUL
 * bytes, it is a conversation: the first byte picks the family, the
 * generation prompt and the thinking switch, then each part is a message
 * whose first byte picks its role (system, user, assistant, tool, or the
 * part's own text as the role).  Rendering must succeed, or refuse Gemma's
 * non-alternating roles with KILN_ERR_INVALID_ARG; every content of a
 * family that writes contents verbatim must appear in the output.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer.h"

#define CHECK(c)                                                               \
    do {                                                                       \
        if (!(c))                                                              \
            __builtin_trap();                                                  \
    } while (0)

#define MAX_MSGS 32

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    tok_chat c;
    kiln_error_clear();
    kiln_status st = tok_chat_detect((const char *)data, size, &c);
    if (st == KILN_OK)
        CHECK(c.family > TOK_CHAT_NONE && c.family < TOK_CHAT_COUNT);
    else
        CHECK(st == KILN_ERR_UNSUPPORTED && kiln_last_error()[0]);
    tok_chat_free(&c);
    if (size < 1)
        return 0;

    /* a NUL-terminated copy cut into messages */
    char *buf = malloc(size + 1);
    if (!buf)
        return 0;
    memcpy(buf, data + 1, size - 1);
    buf[size - 1] = '\0';
    static const char *roles[] = {"system", "user", "assistant", "tool"};
    kiln_chat_message m[MAX_MSGS];
    size_t n = 0;
    for (char *p = buf; p < buf + size - 1 && n < MAX_MSGS; p += strlen(p) + 1) {
        uint8_t r = (uint8_t)p[0];
        if (!*p)
            continue;
        m[n].role = r % 5 < 4 ? roles[r % 5] : p + 1;
        m[n].content = p + 1;
        n++;
    }
    tok_chat chat = {.family = (tok_chat_family)(1 + data[0] % (TOK_CHAT_COUNT - 1))};
    if (data[0] & 0x80)
        chat.default_system = "Default system.";
    kiln_text out = {0};
    int think = (data[0] >> 5) % 3 - 1;
    st = tok_chat_render(&chat, "<bos>", m, n, (data[0] & 0x10) != 0, think, &out);
    if (chat.family == TOK_CHAT_GEMMA)
        CHECK(st == KILN_OK || st == KILN_ERR_INVALID_ARG);
    else
        CHECK(st == KILN_OK);
    if (st == KILN_OK && chat.family == TOK_CHAT_CHATML)
        for (size_t i = 0; i < n; i++)
            CHECK(strstr(out.data, m[i].content) != NULL);
    kiln_text_free(&out);
    free(buf);
    return 0;
}
