/*
 * page.c - the chat page served at GET /: src/server/chat.html, one static
 * file with its script inline and no outside assets, assembled into the
 * binary as it is (.incbin), so the page and the server cannot drift apart
 * and the server needs no files beside its own.  The Makefile rebuilds
 * this object when the page changes.
 */
#include "server/server.h"

__asm__(".section .rodata\n"
        ".balign 16\n"
        ".globl server_chat_page\n"
        ".hidden server_chat_page\n"
        ".type server_chat_page, @object\n"
        "server_chat_page:\n"
        ".incbin \"src/server/chat.html\"\n"
        ".globl server_chat_page_end\n"
        ".hidden server_chat_page_end\n"
        "server_chat_page_end:\n"
        ".byte 0\n"
        ".previous\n");

extern const char server_chat_page_end[];

size_t server_chat_page_size(void) { return (size_t)(server_chat_page_end - server_chat_page); }
